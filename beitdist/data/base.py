"""The dataset-plugin contract.

A dataset plugin is a `DatasetPlugin` subclass with class attributes `name` and `Options` (a
dataclass, the schema of the recipe's `data.options`) and a classmethod
`build(options, split, transform) -> torch.utils.data.Dataset` whose items are dicts of tensors
(`pixel_values`, `labels`, ...). `split` is "train" or "val"; `transform` maps a PIL image (and
target) to tensors and is supplied by the training pipeline of the chosen head.

The details the pipeline (`beitdist.data.pipeline`) relies on:

- `transform(image, target, index) -> dict[str, Tensor]`: `image` is an RGB PIL image, `target`
  an int class id (classification), a (H, W) uint8/int array of class ids (segmentation, already
  reduced, 255 = ignore) or None; `index` is the sample's stable global index, from which the
  transform derives ALL its randomness (with the run's seed and the epoch), so a sample's
  augmentation does not depend on the data-loader worker or the number of workers. The dataset puts
  `index` into the item as a long tensor. With `transform=None` an item is
  `{"image": PIL image, "labels": target, "index": int}` (for inspection).
- `build` may return `None` for a split the data does not have (e.g. no validation shards).
- Decoding is lazy (in `__getitem__` / `__iter__`, never in `build`), and a file that cannot be
  decoded raises `CorruptImageError` naming it. For map-style datasets the pipeline wraps the dataset
  in `SkipCorrupt`, which applies the recipe's `on_corrupt` policy. An `IterableDataset` cannot be
  resumed after it raised, so it applies the policy itself: it exposes a writable attribute
  `on_corrupt` ("stop" | "skip") and adds `num_skipped` to the item that follows skipped samples.
- A class id outside the dataset's range raises `ValueError` naming the file (or index) and the range.
- Classification datasets expose `num_classes` (mixup/cutmix needs it); image folders also `classes`.
  The plugin class may answer `num_classes(options)` without building anything (the preflight
  compares it with the head's classes before a run starts).
- An `IterableDataset` shards itself: the pipeline calls `set_distributed(rank, world_size, seed)`
  once (seed = the run's) and `set_epoch(epoch)` before every pass, when it has them; DataLoader
  workers are read from `torch.utils.data.get_worker_info()`. Without `set_distributed` it can only
  run on one rank.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Callable
from typing import Any, ClassVar, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from beitdist.errors import InputError
from beitdist.schema import plugin_class_problems

logger = logging.getLogger(__name__)

OnCorrupt = Literal["stop", "skip"]
ON_CORRUPT: tuple[str, ...] = ("stop", "skip")
IMG_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""torchvision's ImageFolder extensions (matched case-insensitively)."""
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


class DatasetPlugin:
    name: ClassVar[str]
    Options: ClassVar[type]

    @classmethod
    def build(cls, options: Any, split: str, transform: Callable[..., Any] | None = None) -> Dataset | None:
        raise NotImplementedError(f"dataset {cls.__name__} must implement build")

    @classmethod
    def num_classes(cls, options: Any) -> int | None:
        """The number of classes (label ids 0..n-1), when known without decoding any sample; the
        preflight checks it against the head's `num_classes` before anything runs. None: unknown
        (a stream of shards, an unlabelled set)."""
        return None

    @classmethod
    def label_names(cls, options: Any) -> list[str] | None:
        """The name of each class id (what `beitdist predict` writes), when known without decoding
        any sample; None: unknown (predictions then name classes by their ids)."""
        return None


def contract_problems(cls: Any) -> list[str]:
    """What a class registered as a dataset lacks; empty when it honours the contract."""
    return plugin_class_problems(cls, DatasetPlugin, "beitdist.data.DatasetPlugin", ("build",))


# ------------------------------------------------------------------ helpers for dataset authors
class CorruptImageError(InputError):
    """A file that cannot be decoded as an image (or label map); `path` names it.

    Constructible from one string too: a DataLoader worker's exception is re-created in the main
    process as `type(msg)`, and a two-argument-only class would surface as a bare RuntimeError."""

    def __init__(self, path: str, reason: str | None = None) -> None:
        super().__init__(path if reason is None else f"cannot decode image {path}: {reason}")
        self.path = path

    def with_hint(self) -> CorruptImageError:
        """The same error, telling the user how to go on without the file (`on_corrupt: skip`)."""
        hinted = CorruptImageError(f"{self} (data.on_corrupt: skip replaces undecodable images, up to "
                                   "data.max_corrupt_fraction of them)")
        hinted.path = self.path
        return hinted


def decode_image(source: str | os.PathLike[str] | bytes, name: str | None = None, mode: str | None = "RGB"
                 ) -> Image.Image:
    """Open AND decode now: PIL opens lazily, so a truncated JPEG would otherwise fail much later, in
    the middle of a transform, with a message that names no file. `mode=None` keeps the file's mode
    (label maps); `name` is what errors call the source (the path, or `shard.tar:key.jpg`)."""
    where = name or (str(source) if not isinstance(source, bytes) else "<bytes>")
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            return img.convert(mode) if mode is not None and img.mode != mode else img.copy()
    except _DECODE_ERRORS as err:
        raise CorruptImageError(where, f"{type(err).__name__}: {err}") from err


def check_label(label: int, num_classes: int, where: str) -> int:
    """A class id in [0, num_classes), or a ValueError naming the sample and the allowed range."""
    if not 0 <= int(label) < num_classes:
        raise InputError(f"{where}: label {label} is outside the class range [0, {num_classes - 1}] "
                         f"({num_classes} classes)")
    return int(label)


def check_label_map(labels: np.ndarray, num_classes: int, where: str, ignore_index: int = 255) -> None:
    """Segmentation maps: every value is a class id in [0, num_classes) or `ignore_index`."""
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bad.any():
        values = sorted({int(v) for v in np.unique(labels[bad])})[:8]
        raise InputError(f"{where}: label values {values} are outside the class range [0, {num_classes - 1}] "
                         f"(or {ignore_index} = ignore)")


class ImageDataset(Dataset):
    """Map-style base: subclasses implement `__len__`, `load(index) -> (PIL image, target)` (decoding
    lazily, raising CorruptImageError) and `describe(index)` (the file, for messages)."""

    num_classes: int

    def __init__(self, transform: Callable[..., Any] | None = None) -> None:
        self.transform = transform

    def __len__(self) -> int:
        raise NotImplementedError(f"dataset {type(self).__name__} must implement __len__")

    def load(self, index: int) -> tuple[Image.Image, Any]:
        raise NotImplementedError

    def describe(self, index: int) -> str:
        return f"{type(self).__name__}[{index}]"

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise IndexError(f"{type(self).__name__}: index {index} out of range for {len(self)} samples")
        image, target = self.load(index)
        if self.transform is None:
            return {"image": image, "labels": target, "index": index}
        item = dict(self.transform(image, target, index))
        item["index"] = torch.tensor(index, dtype=torch.long)
        return item


class SkipCorrupt(Dataset):
    """Applies the `on_corrupt` policy to a map-style dataset.

    "stop" re-raises the dataset's CorruptImageError (it names the file). "skip" logs each bad file
    once per process, counts it and returns the item of the next index (i+1, i+2, ... wrapping) that
    decodes: a pure function of the index, so every DataLoader worker (each with its own copy of this
    wrapper) makes the same substitution and batches do not depend on the number of workers. Each item
    carries `num_skipped` (1 when it stands in for a corrupt sample), which the loader sums into a
    run-wide counter; `self.skipped` only counts what this process saw."""

    def __init__(self, dataset: Dataset, on_corrupt: OnCorrupt = "stop", max_tries: int = 64) -> None:
        if on_corrupt not in ON_CORRUPT:
            raise InputError(f"on_corrupt must be one of {ON_CORRUPT}, got {on_corrupt!r}")
        self.dataset, self.on_corrupt, self.max_tries = dataset, on_corrupt, max_tries
        self.skipped = 0
        self._logged: set[str] = set()

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:  # num_classes, classes, ... of the wrapped dataset
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)

    def _note(self, err: CorruptImageError) -> None:
        self.skipped += 1
        if err.path not in self._logged:
            self._logged.add(err.path)
            logger.warning("skipping corrupt image (on_corrupt='skip'): %s", err)

    def __getitem__(self, index: int) -> Any:
        try:
            return self._with_count(self.dataset[index], 0)
        except CorruptImageError as err:
            if self.on_corrupt == "stop":
                raise err.with_hint() from None
            self._note(err)
        n = len(self)
        for step in range(1, min(self.max_tries, n)):
            try:
                return self._with_count(self.dataset[(index + step) % n], 1)
            except CorruptImageError as err:
                self._note(err)
        raise CorruptImageError(f"{index} and the {min(self.max_tries, n) - 1} samples after it",
                                "no sample in reach decodes; is the dataset readable at all?")

    @staticmethod
    def _with_count(item: Any, skipped: int) -> Any:
        if isinstance(item, dict):
            item = dict(item)
            item["num_skipped"] = torch.tensor(skipped, dtype=torch.long)
        return item
