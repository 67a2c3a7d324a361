"""Built-in map-style datasets: scikit-learn's digits, image folders, ADE20K.

Each is a `DatasetPlugin` (name, Options, build) registered through the hook at the bottom. Files are
listed when the dataset is built (so a wrong path fails at once, naming it) but decoded only in
`__getitem__`, where an unreadable file raises `CorruptImageError` naming it; the pipeline's
`SkipCorrupt` wrapper then applies the recipe's `on_corrupt` policy.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from beitdist.data import remote
from beitdist.data.base import IMG_EXTENSIONS, DatasetPlugin, ImageDataset, check_label, check_label_map, decode_image
from beitdist.errors import InputError
from beitdist.hookspecs import hookimpl
from beitdist.schema import check

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------- digits
def stratified_split(labels: np.ndarray, val_fraction: float, seed: int, train_fraction: float = 1.0
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices, each class split on its own: a permutation from (seed, class id), the first
    round(n_c * val_fraction) to val, then the first max(1, round(train_fraction * rest)) of the rest
    to train (a labelled subset that grows monotonically with train_fraction). Sorted."""
    train, val = [], []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        members = members[np.random.default_rng([int(seed), int(c)]).permutation(len(members))]
        n_val = int(round(len(members) * val_fraction))
        rest = members[n_val:]
        n_train = max(1, int(round(len(rest) * train_fraction))) if len(rest) else 0
        val.append(members[:n_val])
        train.append(rest[:n_train])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


class DigitsDataset(ImageDataset):
    """8x8 grey digits as RGB PIL images (levels 0..16 -> 0..255); upsampling is the transform's job."""

    num_classes = 10

    def __init__(self, images: np.ndarray, labels: np.ndarray, indices: np.ndarray,
                 transform: Callable[..., Any] | None = None) -> None:
        super().__init__(transform)
        self.images, self.labels, self.indices = images, labels, indices
        # converted once (345 KB): per sample, the conversion cost as much as the augmentation
        grey = np.round(np.asarray(images) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        self._rgb = np.ascontiguousarray(np.repeat(grey[..., None], 3, axis=-1))

    def __len__(self) -> int:
        return len(self.indices)

    def describe(self, index: int) -> str:
        return f"digits[{int(self.indices[index])}]"

    def load(self, index: int) -> tuple[Image.Image, int]:
        i = int(self.indices[index])
        image = Image.fromarray(self._rgb[i])
        return image, check_label(int(self.labels[i]), self.num_classes, self.describe(index))


@dataclass(frozen=True)
class DigitsOptions:
    val_fraction: float = 0.2
    seed: int = 0
    """Seed of the split (not of augmentation): the split stays fixed when the run's seed changes."""
    train_fraction: float = 1.0
    """Keep this fraction of each class's training images (labelled-subset experiments)."""

    def __post_init__(self) -> None:
        check(0.0 < self.val_fraction < 1.0, "val_fraction", f"expected a value in (0, 1), got {self.val_fraction}")
        check(0.0 < self.train_fraction <= 1.0, "train_fraction", f"expected (0, 1], got {self.train_fraction}")


@functools.lru_cache(maxsize=1)
def load_digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits: images (1797, 8, 8) float64 in 0..16 and labels (1797,)
    int64, exactly `sklearn.datasets.load_digits()`'s. Read straight from the CSV scikit-learn
    ships, found without importing scikit-learn: that import costs every rank a second or more
    before its first step, for a 57 KB file. Cached: the train and val splits share one read."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None:
        raise InputError("the 'digits' dataset needs scikit-learn (pip install scikit-learn)")
    csv = Path(next(iter(spec.submodule_search_locations or [""]), "")) / "datasets" / "data" / "digits.csv.gz"
    if csv.is_file():
        table = np.loadtxt(csv, delimiter=",")
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits  # another scikit-learn layout: its own loader

    digits = load_digits()
    return digits.images, digits.target


class Digits(DatasetPlugin):
    """scikit-learn's bundled handwritten digits: 1,797 real images, 10 classes, no download."""

    name = "digits"
    Options = DigitsOptions

    @classmethod
    def num_classes(cls, options: DigitsOptions) -> int:
        return DigitsDataset.num_classes

    @classmethod
    def label_names(cls, options: DigitsOptions) -> list[str]:
        return [str(digit) for digit in range(DigitsDataset.num_classes)]

    @classmethod
    def build(cls, options: DigitsOptions, split: str, transform: Callable[..., Any] | None = None) -> DigitsDataset:
        images, labels = load_digits_arrays()
        train, val = stratified_split(labels, options.val_fraction, options.seed, options.train_fraction)
        return DigitsDataset(images, labels, train if split == "train" else val, transform)


# --------------------------------------------------------------------------------- image folder
def _is_image(name: str, extensions: tuple[str, ...]) -> bool:
    return name.lower().endswith(extensions)


def list_image_folder(root: Path, classes: list[str], extensions: tuple[str, ...]) -> list[tuple[str, int]]:
    """torchvision's make_dataset: per class (in the given order) every image below its directory,
    walked recursively in sorted order, following links."""
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        class_dir = root / name
        if not class_dir.is_dir():
            continue
        for dirpath, _, filenames in sorted(os.walk(class_dir, followlinks=True)):
            samples.extend((os.path.join(dirpath, f), label) for f in sorted(filenames) if _is_image(f, extensions))
    return samples


def list_remote_image_folder(root: str, classes: list[str], extensions: tuple[str, ...],
                             storage_options: Mapping[str, Any]) -> list[tuple[str, int]]:
    """`list_image_folder` for a URL: per class every image below it, in sorted order."""
    samples: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        class_url = f"{root.rstrip('/')}/{name}"
        if remote.subdirectories(class_url, storage_options) is None:
            continue
        samples.extend((url, label) for url in remote.files_below(class_url, storage_options)
                       if _is_image(url, extensions))
    return samples


class FolderDataset(ImageDataset):
    def __init__(self, samples: list[tuple[str, int]], classes: list[str],
                 transform: Callable[..., Any] | None = None, storage_options: Mapping[str, Any] | None = None
                 ) -> None:
        super().__init__(transform)
        self.storage_options = dict(storage_options or {})
        self.samples, self.classes, self.num_classes = samples, classes, len(classes)
        self.class_to_idx = {c: i for i, c in enumerate(classes)}
        self.targets = [label for _, label in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def describe(self, index: int) -> str:
        return self.samples[index][0]

    def load(self, index: int) -> tuple[Image.Image, int]:
        path, label = self.samples[index]
        source = remote.read_bytes(path, self.storage_options) if remote.is_remote(path) else path
        return decode_image(source, name=path), check_label(label, self.num_classes, path)


@dataclass(frozen=True)
class ImageFolderOptions:
    root: str
    """Directory holding one sub-directory per split, each with one sub-directory per class; a
    local path or a URL (s3://bucket/imagenet, read through fsspec)."""
    train_split: str = "train"
    val_split: str | None = "val"
    """None: no validation loader."""
    extensions: tuple[str, ...] = IMG_EXTENSIONS
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for a URL root, e.g. {endpoint_url: "http://minio:9000", key: ..., secret: ...}."""

    def __post_init__(self) -> None:
        check(bool(self.root), "root", "give the dataset directory")
        check(all(e.startswith(".") for e in self.extensions), "extensions", "each must start with a dot, e.g. '.jpg'")


def _remote_split_dir(root: str, split: str, storage_options: Mapping[str, Any]) -> str:
    layout = f"{root}/<split>/<class>/<image> (e.g. {root}/{split}/cat/0001.jpg)"
    splits = remote.subdirectories(root, storage_options)
    if splits is None:
        raise InputError(f"image_folder: root {root!r} is not a directory (or cannot be listed); expected the "
                         f"layout {layout}")
    if split not in splits:
        raise InputError(f"image_folder: split directory {root.rstrip('/')}/{split} does not exist (found "
                         f"{splits[:10]}); expected the layout {layout}")
    return f"{root.rstrip('/')}/{split}"


def _split_dir(root: str, split: str) -> Path:
    layout = f"{root}/<split>/<class>/<image> (e.g. {root}/{split}/cat/0001.jpg)"
    if not Path(root).is_dir():
        raise InputError(f"image_folder: root {root!r} is not a directory; expected the layout {layout}")
    path = Path(root) / split
    if not path.is_dir():
        found = sorted(p.name for p in Path(root).iterdir() if p.is_dir())[:10]
        raise InputError(f"image_folder: split directory {str(path)!r} does not exist (found {found}); "
                         f"expected the layout {layout}")
    return path


class ImageFolder(DatasetPlugin):
    """torchvision ImageFolder semantics: classes are the sorted sub-directory names of the TRAIN split;
    the val split uses the same class ids (a val class unknown to train is an error)."""

    name = "image_folder"
    Options = ImageFolderOptions

    @classmethod
    def num_classes(cls, options: ImageFolderOptions) -> int:
        return len(cls.classes(options))

    @classmethod
    def label_names(cls, options: ImageFolderOptions) -> list[str]:
        """The class directory names, in label-id order (torchvision's ImageFolder)."""
        return cls.classes(options)

    @classmethod
    def classes(cls, options: ImageFolderOptions) -> list[str]:
        if remote.is_remote(options.root):
            url = _remote_split_dir(options.root, options.train_split, options.storage_options)
            found = remote.subdirectories(url, options.storage_options) or []
            if not found:
                raise InputError(f"image_folder: no class directories in {url!r}; expected {url}/<class>/<image>")
            return found
        train_dir = _split_dir(options.root, options.train_split)
        classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir())
        if not classes:
            raise InputError(f"image_folder: no class directories in {str(train_dir)!r}; expected "
                             f"{train_dir}/<class>/<image>")
        return classes

    @classmethod
    def build(cls, options: ImageFolderOptions, split: str, transform: Callable[..., Any] | None = None
              ) -> FolderDataset | None:
        name = options.train_split if split == "train" else options.val_split
        if name is None:
            return None
        classes = cls.classes(options)
        extensions = tuple(e.lower() for e in options.extensions)
        split_dir: Path | str
        if remote.is_remote(options.root):
            split_dir = _remote_split_dir(options.root, name, options.storage_options)
            present = set(remote.subdirectories(split_dir, options.storage_options) or [])
        else:
            split_dir = _split_dir(options.root, name)
            present = {e.name for e in os.scandir(split_dir) if e.is_dir()}
        unknown = sorted(present - set(classes))
        if unknown:
            raise InputError(f"image_folder: classes {unknown[:10]} in {str(split_dir)!r} are not in the train "
                             f"split {options.train_split!r}, whose classes define the label ids")
        if isinstance(split_dir, str):
            samples = list_remote_image_folder(split_dir, classes, extensions, options.storage_options)
        else:
            samples = list_image_folder(split_dir, classes, extensions)
        if not samples:
            raise InputError(f"image_folder: no images with extensions {list(options.extensions)} under "
                             f"{str(split_dir)!r}; expected {split_dir}/<class>/<image>")
        empty = sorted(set(classes) - {classes[label] for _, label in samples})
        if empty and split == "train":
            raise InputError(f"image_folder: class directories without images in {str(split_dir)!r}: {empty[:10]}")
        if empty:
            logger.warning("image_folder: %d classes have no images in %s: %s", len(empty), split_dir, empty[:10])
        return FolderDataset(samples, classes, transform, options.storage_options)


# -------------------------------------------------------------------------------------- ADE20K
class SegmentationDataset(ImageDataset):
    """(image, label map) pairs; the map is reduced (0 -> 255, others - 1) when `reduce_labels`."""

    def __init__(self, pairs: list[tuple[str, str]], num_classes: int, reduce_labels: bool,
                 transform: Callable[..., Any] | None = None) -> None:
        super().__init__(transform)
        self.pairs, self.num_classes, self.reduce_labels = pairs, num_classes, reduce_labels

    def __len__(self) -> int:
        return len(self.pairs)

    def describe(self, index: int) -> str:
        return self.pairs[index][0]

    def load(self, index: int) -> tuple[Image.Image, np.ndarray]:
        image_path, label_path = self.pairs[index]
        image = decode_image(image_path)
        labels = np.array(decode_image(label_path, mode=None))
        if labels.ndim != 2:
            raise InputError(f"{label_path}: a label map must have one channel of class ids, got shape {labels.shape}")
        if labels.shape != (image.height, image.width):
            raise InputError(f"{label_path}: label map is {labels.shape[1]}x{labels.shape[0]} but image "
                             f"{image_path} is {image.width}x{image.height}")
        labels = labels.astype(np.int64)
        if self.reduce_labels:  # transformers' / mmseg's reduce_zero_label: 0 -> 255, others - 1
            labels = np.where(labels == 0, 255, labels - 1)
            labels[labels == 254] = 255
        check_label_map(labels, self.num_classes, label_path)
        return image, labels


@dataclass(frozen=True)
class Ade20kOptions:
    root: str
    """ADEChallengeData2016 directory: images/{training,validation}/*.jpg, annotations/{...}/*.png."""
    reduce_labels: bool = True
    """0 ("other") becomes 255 (ignored), classes 1..150 become 0..149."""
    num_classes: int = 150

    def __post_init__(self) -> None:
        check(bool(self.root), "root", "give the ADEChallengeData2016 directory")
        check(0 < self.num_classes <= 255, "num_classes", f"expected 1..255, got {self.num_classes}")


class Ade20k(DatasetPlugin):
    name = "ade20k"
    Options = Ade20kOptions
    SPLITS = {"train": "training", "val": "validation"}

    @classmethod
    def num_classes(cls, options: Ade20kOptions) -> int:
        return options.num_classes

    @classmethod
    def build(cls, options: Ade20kOptions, split: str, transform: Callable[..., Any] | None = None
              ) -> SegmentationDataset:
        sub = cls.SPLITS[split]
        layout = f"{options.root}/images/{sub}/<name>.jpg and {options.root}/annotations/{sub}/<name>.png"
        image_dir, label_dir = Path(options.root) / "images" / sub, Path(options.root) / "annotations" / sub
        for d in (image_dir, label_dir):
            if not d.is_dir():
                raise InputError(f"ade20k: directory {str(d)!r} does not exist; expected the layout {layout}")
        images = {Path(f).stem: f for f in sorted(os.listdir(image_dir)) if _is_image(f, IMG_EXTENSIONS)}
        labels = {Path(f).stem: f for f in sorted(os.listdir(label_dir)) if f.lower().endswith(".png")}
        if not images:
            raise InputError(f"ade20k: no images in {str(image_dir)!r}; expected the layout {layout}")
        no_label, no_image = sorted(set(images) - set(labels)), sorted(set(labels) - set(images))
        if no_label or no_image:
            raise InputError(f"ade20k ({split}): images and annotations do not pair up: "
                             f"{len(no_label)} images without a .png annotation (e.g. {no_label[:5]}), "
                             f"{len(no_image)} annotations without an image (e.g. {no_image[:5]})")
        pairs = [(str(image_dir / images[k]), str(label_dir / labels[k])) for k in sorted(images)]
        return SegmentationDataset(pairs, options.num_classes, options.reduce_labels, transform)


@hookimpl
def beitdist_register_datasets(registry: Any) -> None:
    registry.add(Digits)
    registry.add(ImageFolder)
    registry.add(Ade20k)
