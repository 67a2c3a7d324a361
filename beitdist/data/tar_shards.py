"""Streaming classification data from .tar shards (webdataset layout), for ImageNet-22k-scale runs.

A shard is a plain tar file; a sample is the run of consecutive members sharing a basename (the
name up to the first dot of its last path component, as webdataset does): `000123.jpg` and
`000123.cls` (the class id as text) form sample `000123`. Shards are read sequentially, never
indexed, so millions of images cost one open file per worker.

Distribution: every epoch the shard list is shuffled with (seed, epoch), identically on every rank;
shard i of that order goes to global worker i mod (world_size * num_workers), where global worker =
rank * num_workers + DataLoader worker id. Each sample is thus read exactly once per epoch across
the job. With fewer shards than global workers, the workers left without a shard yield nothing and
some ranks get fewer (or no) samples than others; a distributed loop then stalls at the first
collective op a short rank skips. A warning is logged; use at least world_size * num_workers shards
(ideally a multiple of it: ranks then differ by at most one shard's worth per worker).

Inside a worker, samples pass through a shuffle buffer of `shuffle_buffer` samples drawn from
(seed, epoch, global worker); augmentation randomness comes from (seed, epoch, sample id), the id
being (shard number in the sorted list) << 32 | (sample number in the shard), so an image's
augmentation does not depend on which worker reads it.
"""

from __future__ import annotations

import glob
import logging
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from beitdist.data import remote
from beitdist.data.base import ON_CORRUPT, CorruptImageError, DatasetPlugin, check_label, decode_image
from beitdist.errors import InputError
from beitdist.hookspecs import hookimpl
from beitdist.schema import check

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


def expand_paths(patterns: tuple[str, ...] | list[str], storage_options: Mapping[str, Any] | None = None
                 ) -> list[str]:
    """Globs and webdataset brace ranges (`shard-{000..099}.tar`) -> sorted, de-duplicated paths;
    URLs (`s3://bucket/train-{000..099}.tar`) are listed through fsspec (`beitdist.data.remote`)."""

    def matches(name: str) -> list[str]:
        if remote.is_remote(name):
            return remote.glob(name, storage_options)
        return sorted(glob.glob(os.path.expanduser(name)))

    out: list[str] = []
    for pattern in patterns:
        match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
        names = [pattern]
        if match:
            lo, hi = match.groups()
            width = len(lo)
            names = [pattern[: match.start()] + str(i).zfill(width) + pattern[match.end() :]
                     for i in range(int(lo), int(hi) + 1)]
        if match and all(remote.is_remote(n) and not any(c in n for c in "*?[") for n in names):
            listed = set(remote.glob(pattern[: match.start()] + "*" + pattern[match.end():], storage_options))
            out.extend(n if n in listed else f"missing:{n}" for n in names)  # one listing, not one request each
            continue
        out.extend(p for name in names for p in (matches(name) or [f"missing:{name}"]))
    paths = sorted(set(out))
    missing = [p.removeprefix("missing:") for p in paths if p.startswith("missing:")]
    missing += [p for p in paths if not p.startswith("missing:") and not remote.is_remote(p) and not os.path.isfile(p)]
    if missing:
        raise InputError(f"tar shards not found: {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"(from patterns {list(patterns)}); expected .tar files (local paths or URLs)")
    return paths


def _split_name(name: str) -> tuple[str, str]:
    head, _, last = name.rpartition("/")
    stem, dot, ext = last.partition(".")
    return (f"{head}/{stem}" if head else stem), (ext.lower() if dot else "")


def iter_tar_samples(path: str, storage_options: Mapping[str, Any] | None = None
                     ) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) for each run of members sharing a basename, in file order; a URL
    is streamed through fsspec, never downloaded whole."""
    with ExitStack() as stack:
        fileobj = stack.enter_context(remote.open_binary(path, storage_options)) if remote.is_remote(path) else None
        tar = stack.enter_context(tarfile.open(path if fileobj is None else None, mode="r|*", fileobj=fileobj))
        yield from _runs(tar)


def _runs(tar: tarfile.TarFile) -> Iterator[tuple[str, dict[str, bytes]]]:
    key: str | None = None
    files: dict[str, bytes] = {}
    for member in tar:
        if not member.isfile():
            continue
        k, ext = _split_name(member.name)
        if key is not None and k != key:
            yield key, files
            files = {}
        key = k
        handle = tar.extractfile(member)
        files[ext] = handle.read() if handle is not None else b""
    if key is not None:
        yield key, files


class TarShardDataset(IterableDataset):
    """The stream of one split; `set_distributed` / `set_epoch` are called by the pipeline."""

    def __init__(self, shards: list[str], num_classes: int, transform: Callable[..., Any] | None = None,
                 shuffle: bool = True, shuffle_buffer: int = 1000, seed: int | None = None,
                 label_ext: str | None = "cls", on_corrupt: str = "stop",
                 storage_options: Mapping[str, Any] | None = None) -> None:
        self.shards, self.num_classes, self.transform = list(shards), num_classes, transform
        self.storage_options = dict(storage_options or {})
        self.shuffle, self.shuffle_buffer, self.label_ext = shuffle, shuffle_buffer, label_ext
        self._fixed_seed = seed is not None
        self.seed = 0 if seed is None else int(seed)
        self.on_corrupt = on_corrupt
        self.rank, self.world_size, self.epoch = 0, 1, 0
        self.skipped = 0
        self._logged: set[str] = set()

    def set_distributed(self, rank: int, world_size: int, seed: int | None = None) -> None:
        """Called by the pipeline; `seed` (the run's) is used unless the options fixed one."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        if seed is not None and not self._fixed_seed:
            self.seed = int(seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shards_for(self, worker_id: int, num_workers: int) -> list[tuple[int, str]]:
        """(index in the sorted shard list, path) of the shards one worker reads this epoch."""
        order = np.arange(len(self.shards))
        if self.shuffle:
            order = np.random.default_rng([int(self.seed), self.epoch]).permutation(len(self.shards))
        total = self.world_size * num_workers
        me = self.rank * num_workers + worker_id
        if len(self.shards) < total and me == 0:
            logger.warning("%d shards for %d global workers (%d ranks x %d workers): %d workers get no shard and "
                           "ranks see unequal sample counts", len(self.shards), total, self.world_size, num_workers,
                           total - len(self.shards))
        return [(int(i), self.shards[int(i)]) for i in order[me::total]]

    def _decode(self, shard: str, key: str, files: dict[str, bytes], sample_id: int) -> dict[str, Any]:
        where = f"{shard}:{key}"
        ext = next((e for e in IMAGE_EXTS if e in files), None)
        if ext is None:
            raise CorruptImageError(where, f"no image member (expected one of .{', .'.join(IMAGE_EXTS)}; "
                                           f"found {sorted(files)})")
        if self.label_ext is not None and self.label_ext not in files:
            raise CorruptImageError(where, f"no .{self.label_ext} label member (found {sorted(files)})")
        image = decode_image(files[ext], name=f"{where}.{ext}")
        label = None
        if self.label_ext is not None:
            try:
                label = int(files[self.label_ext].decode().strip())
            except ValueError as err:
                raise InputError(f"{where}.{self.label_ext}: label is not an integer: {err}") from None
            check_label(label, self.num_classes, f"{where}.{self.label_ext}")
        if self.transform is None:
            return {"image": image, "labels": label, "index": sample_id}
        item = dict(self.transform(image, label, sample_id))
        item["index"] = torch.tensor(sample_id, dtype=torch.long)
        return item

    def _encoded(self, worker_id: int, num_workers: int) -> Iterator[tuple[str, str, dict[str, bytes], int]]:
        """(shard, key, members, sample id) of this worker's shards, still encoded."""
        for shard_idx, shard in self.shards_for(worker_id, num_workers):
            for k, (key, files) in enumerate(iter_tar_samples(shard, self.storage_options)):
                yield shard, key, files, (shard_idx << 32) | k

    def _shuffled(self, stream: Iterator[Any], num_workers: int, worker_id: int) -> Iterator[Any]:
        """A shuffle buffer over the still-encoded samples: it holds `shuffle_buffer` JPEGs'
        bytes (tens of KB each) rather than transformed tensors (0.6 MB each at 224 px), and a
        worker's first batch waits for reading the buffer full, not for transforming it."""
        rng = np.random.default_rng([int(self.seed), self.epoch, self.rank * num_workers + worker_id, 1])
        buffer: list[Any] = []
        for item in stream:
            if len(buffer) < self.shuffle_buffer:
                buffer.append(item)
                continue
            j = int(rng.integers(len(buffer)))
            buffer[j], item = item, buffer[j]
            yield item
        rng.shuffle(buffer)
        yield from buffer

    def _decoded(self, stream: Iterator[tuple[str, str, dict[str, bytes], int]]) -> Iterator[dict[str, Any]]:
        """Decoded, transformed items; a skipped sample is counted on the next item (skips after
        a worker's last good sample are only logged and in `self.skipped`)."""
        pending = 0
        for shard, key, files, sample_id in stream:
            try:
                item = self._decode(shard, key, files, sample_id)
            except CorruptImageError as err:
                if self.on_corrupt == "stop":
                    raise err.with_hint() from None
                self.skipped += 1
                pending += 1
                if err.path not in self._logged:
                    self._logged.add(err.path)
                    logger.warning("skipping corrupt sample (on_corrupt='skip'): %s", err)
                continue
            if isinstance(item, dict) and self.transform is not None:
                item["num_skipped"] = torch.tensor(pending, dtype=torch.long)
                pending = 0
            yield item

    def __iter__(self) -> Iterator[dict[str, Any]]:
        if self.on_corrupt not in ON_CORRUPT:
            raise InputError(f"on_corrupt must be one of {ON_CORRUPT}, got {self.on_corrupt!r}")
        info = get_worker_info()
        worker_id, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        stream = self._encoded(worker_id, num_workers)
        if self.shuffle and self.shuffle_buffer > 1:
            stream = self._shuffled(stream, num_workers, worker_id)
        yield from self._decoded(stream)


@dataclass(frozen=True)
class TarShardOptions:
    num_classes: int
    """Labels must lie in [0, num_classes) (21841 for the full ImageNet-22k)."""
    train: tuple[str, ...] = ()
    """Globs or brace ranges of .tar shards, local or URLs, e.g. ["/data/in22k/train-{000000..014999}.tar"]
    or ["s3://bucket/in22k/train-{000000..014999}.tar"]."""
    val: tuple[str, ...] = ()
    """Validation shards; empty means no validation loader."""
    shuffle_buffer: int = 1000
    """Samples held per worker to shuffle within a shard stream (still encoded: costs that many
    files' bytes of memory, e.g. ~0.1 GB for 1000 ImageNet JPEGs)."""
    label_ext: str | None = "cls"
    """Extension of the member holding the class id as text; None for unlabelled data (MIM only)."""
    seed: int | None = None
    """Shard-order / buffer seed; None takes the run's seed (given by the pipeline's set_distributed)."""
    storage_options: dict[str, Any] = field(default_factory=dict)
    """fsspec options for shard URLs, e.g. {endpoint_url: "http://minio:9000", key: ..., secret: ...} for an
    S3-compatible store (or leave empty and set AWS_ENDPOINT_URL / AWS_ACCESS_KEY_ID / ...)."""

    def __post_init__(self) -> None:
        check(self.num_classes > 0, "num_classes", f"expected a positive int, got {self.num_classes}")
        check(len(self.train) > 0, "train", "give at least one shard path or glob for the train split")
        check(self.shuffle_buffer >= 0, "shuffle_buffer", f"expected >= 0, got {self.shuffle_buffer}")


class TarShards(DatasetPlugin):
    name = "tar_shards"
    Options = TarShardOptions

    @classmethod
    def build(cls, options: TarShardOptions, split: str, transform: Callable[..., Any] | None = None
              ) -> TarShardDataset | None:
        patterns = options.train if split == "train" else options.val
        if not patterns:
            return None
        return TarShardDataset(expand_paths(patterns, options.storage_options), options.num_classes, transform,
                               shuffle=split == "train", shuffle_buffer=options.shuffle_buffer, seed=options.seed,
                               label_ext=options.label_ext, storage_options=options.storage_options)


@hookimpl
def beitdist_register_datasets(registry: Any) -> None:
    registry.add(TarShards)


__all__ = ["TarShardDataset", "TarShardOptions", "TarShards", "expand_paths", "iter_tar_samples"]