"""From a recipe's `data` section to the train and validation loaders of one rank.

    build_loaders(DataConfig, head or DataNeeds, image_size, patch_size, rank=, world_size=, seed=,
                  tokenizer_input_size=) -> (train BeitLoader, val BeitLoader | None)

Batches are dicts: "pixel_values" (B, 3, S, S) float32 plus what the head declares in its
`data_needs` (`beitdist.data.needs.DataNeeds`): class labels (mixup/cutmix soft targets when on),
label maps, a blockwise mask, a tokenizer view. The pipeline asks the head for that declaration,
never for its name.

Reproducibility: augmentation draws from (seed, epoch, sample index), mixup from (seed, epoch, first
index of the batch), and the order from (seed, epoch) in `ResumableDistributedSampler`, so batches do
not depend on `num_workers`, and a run resumed from `loader.state_dict()` continues with exactly the
samples it would have seen, also at another world size (see `beitdist.data.sampler`). Workers are
not persistent: each pass forks them afresh, so they see the epoch set just before.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from beitdist import background
from beitdist.data import presets
from beitdist.data.base import OnCorrupt, SkipCorrupt
from beitdist.data.mixup import Mixup
from beitdist.data.needs import DataNeeds
from beitdist.data.sampler import ResumableDistributedSampler
from beitdist.errors import InputError
from beitdist.schema import check, parse

logger = logging.getLogger(__name__)

_MIXUP_STREAM = 0x6D6978  # keeps the batch generators apart from the per-sample ones


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation; the defaults are BEiT's (unilm fine-tuning / pretraining, mmseg ADE20K)."""

    normalization: Literal["imagenet", "standard"] = "imagenet"
    """"imagenet": mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225), unilm's recipes;
    "standard": 0.5 / 0.5, what transformers' BeitImageProcessor (and BEiT's ADE20K config) use."""
    interpolation: Literal["bicubic", "bilinear", "lanczos"] = "bicubic"
    scale: tuple[float, float] = (0.08, 1.0)
    """RandomResizedCrop area fraction (classification and MIM)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    color_jitter: float | None = 0.4
    """Brightness = contrast = saturation jitter. MIM always applies it; classification only without
    RandAugment unless `force_color_jitter` (timm's rule)."""
    force_color_jitter: bool = False
    rand_augment: str | None = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    """RandomErasing probability (after normalisation)."""
    remode: Literal["pixel", "rand", "const"] = "pixel"
    recount: int = 1
    mixup: float = 0.8
    """Mixup alpha; 0 disables (with cutmix 0 too, labels stay hard and the head smooths them)."""
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    """Folded into the mixup soft targets (only used when mixup/cutmix is on)."""
    tokenizer_interpolation: Literal["lanczos", "bicubic", "bilinear"] = "lanczos"
    seg_ratio_range: tuple[float, float] = (0.5, 2.0)
    seg_base_scale: tuple[int, int] | None = None
    """(long, short) bound before the ratio; None = (4 * image_size, image_size), mmseg's (2560, 640)."""
    cat_max_ratio: float = 0.75
    photometric: bool = True
    eval_crop_pct: float | None = None
    """None: evaluation resizes to S x S (transformers); e.g. 0.875: shorter side to S / 0.875 and a
    centre crop (timm / unilm's eval)."""

    def __post_init__(self) -> None:
        check(0 < self.scale[0] <= self.scale[1], "scale", f"expected 0 < min <= max, got {self.scale}")
        check(0 < self.ratio[0] <= self.ratio[1], "ratio", f"expected 0 < min <= max, got {self.ratio}")
        for name in ("hflip", "reprob", "mixup_prob", "mixup_switch_prob", "cat_max_ratio"):
            value = getattr(self, name)
            check(0.0 <= value <= 1.0, name, f"expected a probability in [0, 1], got {value}")
        check(self.mixup >= 0 and self.cutmix >= 0, "mixup", f"alphas must be >= 0, got {self.mixup}, {self.cutmix}")
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", f"expected [0, 1), got {self.label_smoothing}")
        check(self.color_jitter is None or self.color_jitter >= 0, "color_jitter",
              f"expected >= 0, got {self.color_jitter}")
        check(self.recount >= 1, "recount", f"expected >= 1, got {self.recount}")
        check(0 < self.seg_ratio_range[0] <= self.seg_ratio_range[1], "seg_ratio_range",
              f"expected 0 < min <= max, got {self.seg_ratio_range}")
        check(self.eval_crop_pct is None or 0 < self.eval_crop_pct <= 1, "eval_crop_pct",
              f"expected (0, 1] or null, got {self.eval_crop_pct}")
        if self.rand_augment:
            from beitdist.data.augment import rand_augment

            try:
                rand_augment(self.rand_augment)
            except ValueError as err:
                check(False, "rand_augment", str(err))


@dataclass(frozen=True)
class DataConfig:
    """The recipe's `data` section."""

    dataset: str
    """A registered dataset plugin: digits, image_folder, ade20k, tar_shards, or a third-party one."""
    options: dict[str, Any] = field(default_factory=dict)
    """The dataset's own options (its `Options` dataclass), validated when the loaders are built."""
    batch_size: int = 32
    """Per rank."""
    num_workers: int = 0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    mask_ratio: float = 75 / 196
    """Heads that need masks (MIM, ...): fraction of patches masked (unilm: 75 of 196);
    `num_masking_patches` overrides it."""
    num_masking_patches: int | None = None
    min_mask_patches_per_block: int | None = None
    """None: unilm's 16 scaled to the grid."""
    max_mask_patches_per_block: int | None = None
    on_corrupt: OnCorrupt = "stop"
    """"stop": an undecodable image raises, naming the file; "skip": log it, count it
    (`loader.corrupt_skipped`, and `corrupt_skipped` in train_result.json) and use the next good
    sample."""
    max_corrupt_fraction: float = 0.01
    """With "skip": stop the run when more than this fraction of the samples a rank has read
    failed to decode (judged from the 100th sample on): a dataset that is mostly unreadable is a
    mistake to fix, not noise to train through."""
    val_batch_size: int | None = None
    """None: batch_size."""
    drop_last: bool = True
    """Train loader: drop each rank's last incomplete batch."""
    shuffle: bool = True
    pin_memory: bool | None = None
    """Page-locked training batches, so the copy to the GPU runs asynchronously. None: when
    training on a GPU (`beitdist.distributed.uses_cuda`). Validation batches are never pinned: torch
    keeps pinned blocks cached for the run, for batches an evaluation streams once in a while."""

    def __post_init__(self) -> None:
        check(bool(self.dataset), "dataset", "name a dataset plugin")
        check(self.batch_size >= 1, "batch_size", f"expected >= 1, got {self.batch_size}")
        check(self.val_batch_size is None or self.val_batch_size >= 1, "val_batch_size",
              f"expected >= 1, got {self.val_batch_size}")
        check(self.num_workers >= 0, "num_workers", f"expected >= 0, got {self.num_workers}")
        check(0.0 <= self.max_corrupt_fraction <= 1.0, "max_corrupt_fraction",
              f"expected a fraction in [0, 1], got {self.max_corrupt_fraction}")
        check(0.0 < self.mask_ratio <= 1.0, "mask_ratio", f"expected (0, 1], got {self.mask_ratio}")
        check(self.num_masking_patches is None or self.num_masking_patches >= 1, "num_masking_patches",
              f"expected >= 1, got {self.num_masking_patches}")


CORRUPT_SHARE_AFTER = 100
"""Samples a rank reads before its share of corrupt ones is judged (one bad file in the first
batch is not 1/32 of a dataset)."""


class CorruptDataError(InputError):
    """More of the dataset failed to decode than `data.max_corrupt_fraction` allows."""


class Collate:
    """Stacks items; applies mixup/cutmix to training batches of class ids."""

    def __init__(self, mixup: Mixup | None = None, seed: int = 0) -> None:
        self.mixup, self.seed, self.epoch = mixup, int(seed), 0

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        batch = {key: torch.stack([item[key] for item in items]) for key in items[0]}
        if self.mixup is not None:
            first = int(batch["index"][0]) if "index" in batch else 0
            rng = np.random.default_rng([self.seed, self.epoch, first, _MIXUP_STREAM])
            batch["pixel_values"], batch["labels"] = self.mixup(batch["pixel_values"], batch["labels"], rng,
                                                                 inplace=True)  # stacked just above
        return batch


class BeitLoader:
    """A DataLoader plus what a resumable run needs: `set_epoch`, `state_dict`/`load_state_dict`
    (the sampler's {"epoch", "position"}, position in GLOBAL samples), and `corrupt_skipped`, the
    number of corrupt samples replaced so far (summed over workers; per rank). A completed pass moves
    a training loader to the next epoch by itself; breaking out of a pass keeps the position."""

    def __init__(self, dataloader: DataLoader, transform: presets.SampleTransform, collate: Collate,
                 sampler: ResumableDistributedSampler | None, train: bool,
                 max_corrupt_fraction: float | None = None) -> None:
        self.dataloader, self.transform, self.collate, self.sampler = dataloader, transform, collate, sampler
        self.dataset, self.train = dataloader.dataset, train
        self.batch_size = dataloader.batch_size
        self.epoch = 0
        self.corrupt_skipped = 0
        self.samples_read = 0
        """Samples this rank tried to decode: delivered ones plus the corrupt ones passed over."""
        self.max_corrupt_fraction = max_corrupt_fraction

    def _check_corrupt_share(self) -> None:
        limit = self.max_corrupt_fraction
        if limit is None or self.samples_read < CORRUPT_SHARE_AFTER or self.corrupt_skipped <= limit * self.samples_read:
            return
        share = self.corrupt_skipped / self.samples_read
        raise CorruptDataError(
            f"data.max_corrupt_fraction: {self.corrupt_skipped} of the {self.samples_read} samples this rank read "
            f"({share:.1%}) failed to decode, more than {limit:.1%}; fix the dataset (the log names each file) or "
            "raise data.max_corrupt_fraction")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch)

    def __len__(self) -> int:
        return len(self.dataloader)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        self.transform.set_epoch(self.epoch)
        self.collate.epoch = self.epoch
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        # worker processes are forked here: between background calls (see beitdist.background)
        with background.forking() if self.dataloader.num_workers > 0 else contextlib.nullcontext():
            batches = iter(self.dataloader)
        delivered = 0
        try:
            for batch in batches:
                delivered += 1
                skipped = batch.pop("num_skipped", None)
                self.samples_read += len(batch["pixel_values"])
                if skipped is not None:
                    self.corrupt_skipped += int(skipped.sum())
                    self.samples_read += int(skipped.sum())  # the corrupt ones were read too
                    self._check_corrupt_share()
                batch.pop("index", None)
                if self.train and self.sampler is not None:
                    self.sampler.advance(len(batch["pixel_values"]))
                yield batch
        finally:
            # Stop the workers now when the loop broke off or a worker raised: left to the garbage
            # collector (the traceback holds this frame in a cycle), torch waits 5 s per worker.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
        if self.train and self.sampler is None and delivered == 0:  # `while True: yield from loader` would spin
            raise InputError(f"the streaming train data gave this rank no batch in epoch {self.epoch}: too few shards "
                             f"or samples for the ranks x workers x batch_size (see beitdist.data.tar_shards)")
        if self.train:
            self.set_epoch(self.epoch + 1)

    def state_dict(self) -> dict[str, int]:
        if self.sampler is not None:
            return self.sampler.state_dict()
        return {"epoch": self.epoch, "position": 0}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if self.sampler is not None:
            self.sampler.load_state_dict(state)
        elif int(state.get("position", 0)):
            logger.warning("a streaming dataset cannot resume mid-epoch: epoch %s restarts from its beginning",
                           state.get("epoch"))
        self.epoch = int(state["epoch"])


def data_needs(head: str | DataNeeds) -> DataNeeds:
    """`head` itself, or what the registered head of that name declares (`Head.data_needs`)."""
    if isinstance(head, DataNeeds):
        return head
    from beitdist.plugins import head_class

    return head_class(head).data_needs


def _transforms(cfg: DataConfig, needs: DataNeeds, image_size: int, patch_size: int, seed: int,
                tokenizer_input_size: int | None) -> tuple[presets.SampleTransform, presets.SampleTransform]:
    aug = cfg.augment
    if needs.labels == "class":
        return presets.ClassificationTrain(image_size, aug, seed), presets.Eval(image_size, aug, needs.labels)
    if needs.labels == "map":
        return presets.SegmentationTrain(image_size, aug, seed), presets.Eval(image_size, aug, needs.labels)
    if needs.tokenizer and (tokenizer_input_size is None or tokenizer_input_size < 1):
        raise InputError("the head's targets come from a visual tokenizer: build_loaders needs tokenizer_input_size "
                         "(the tokenizer's input side, e.g. 112 for DALL-E)")
    tokenizer_size = tokenizer_input_size if needs.tokenizer else None
    masks = None
    if needs.mask:
        masks = presets.masking_generator(image_size, patch_size, cfg.num_masking_patches, cfg.mask_ratio,
                                          cfg.min_mask_patches_per_block, cfg.max_mask_patches_per_block)
    return (presets.MimTrain(image_size, tokenizer_size, aug, masks, seed),
            presets.MimEval(image_size, tokenizer_size, aug, masks, seed))


def _mixup(cfg: DataConfig, needs: DataNeeds, dataset: Dataset) -> Mixup | None:
    aug = cfg.augment
    if needs.labels != "class" or (aug.mixup <= 0 and aug.cutmix <= 0) or aug.mixup_prob <= 0:
        return None
    num_classes = getattr(dataset, "num_classes", None)
    if not isinstance(num_classes, int):
        raise InputError(f"mixup/cutmix needs the number of classes, but dataset {cfg.dataset!r} does not expose "
                         "num_classes; set data.augment.mixup and data.augment.cutmix to 0")
    return Mixup(num_classes, aug.mixup, aug.cutmix, aug.mixup_prob, aug.mixup_switch_prob, aug.label_smoothing)


def _loader(dataset: Dataset, transform: presets.SampleTransform, collate: Collate, cfg: DataConfig, *,
            train: bool, batch_size: int, rank: int, world_size: int, seed: int) -> BeitLoader:
    sampler = None
    if isinstance(dataset, IterableDataset):
        if hasattr(dataset, "set_distributed"):
            dataset.set_distributed(rank, world_size, seed)
        elif world_size > 1:
            raise InputError(f"streaming dataset {cfg.dataset!r} cannot shard itself across ranks "
                             "(it has no set_distributed); see beitdist.data.base")
        if cfg.on_corrupt == "skip" and not hasattr(dataset, "on_corrupt"):
            raise InputError(f"streaming dataset {cfg.dataset!r} cannot skip corrupt samples (no on_corrupt attribute)")
        if hasattr(dataset, "on_corrupt"):
            dataset.on_corrupt = cfg.on_corrupt
    else:
        dataset = SkipCorrupt(dataset, cfg.on_corrupt)
        sampler = ResumableDistributedSampler(len(dataset), rank, world_size, seed, shuffle=train and cfg.shuffle,
                                              drop_last=False)
    dataloader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=cfg.num_workers,
                            collate_fn=collate, drop_last=train and cfg.drop_last, pin_memory=train and _pin_memory(cfg),
                            persistent_workers=False, generator=torch.Generator().manual_seed(int(seed)))
    limit = cfg.max_corrupt_fraction if cfg.on_corrupt == "skip" else None
    return BeitLoader(dataloader, transform, collate, sampler, train, max_corrupt_fraction=limit)


def _pin_memory(cfg: DataConfig) -> bool:
    if cfg.pin_memory is not None:
        return cfg.pin_memory
    from beitdist.distributed import uses_cuda

    return uses_cuda()


def build_loaders(data_cfg: DataConfig | Mapping[str, Any], head: str | DataNeeds, image_size: int, patch_size: int,
                  *, rank: int = 0, world_size: int = 1, seed: int = 0, tokenizer_input_size: int | None = None
                  ) -> tuple[BeitLoader, BeitLoader | None]:
    """The (train, val) loaders of one rank; val is None when the dataset has no validation split.
    `head` is a registered head's name (its `data_needs` say what the batches hold) or a
    `DataNeeds`; `data_cfg` may be the plain recipe mapping (validated here, errors name `data.<field>`)."""
    cfg = parse(DataConfig, data_cfg, "data") if isinstance(data_cfg, Mapping) else data_cfg
    needs = data_needs(head)
    if image_size < 1 or patch_size < 1 or image_size % patch_size:
        raise InputError(f"image_size {image_size} must be a positive multiple of patch_size {patch_size}")
    from beitdist.plugins import dataset_class

    plugin = dataset_class(cfg.dataset)
    options = parse(plugin.Options, cfg.options, "data.options")
    train_tf, val_tf = _transforms(cfg, needs, image_size, patch_size, seed, tokenizer_input_size)
    train_set = plugin.build(options, "train", train_tf)
    if train_set is None:
        raise InputError(f"dataset {cfg.dataset!r} has no train split with options {dataclasses.asdict(options)}")
    val_set = plugin.build(options, "val", val_tf)
    common = {"rank": rank, "world_size": world_size, "seed": seed}
    train = _loader(train_set, train_tf, Collate(_mixup(cfg, needs, train_set), seed), cfg, train=True,
                    batch_size=cfg.batch_size, **common)
    if train.sampler is not None and len(train) == 0:  # a loop over it would never take a step
        raise InputError(f"the train split of {cfg.dataset!r} has {len(train_set)} samples: with {world_size} ranks "
                         f"and batch_size {cfg.batch_size} per rank (drop_last={cfg.drop_last}) no rank gets a batch")
    val = None
    if val_set is not None:
        val = _loader(val_set, val_tf, Collate(), cfg, train=False, batch_size=cfg.val_batch_size or cfg.batch_size,
                      **common)
    logger.info("data %s (batches of %s): %s train samples, %s val samples on rank %d of %d", cfg.dataset,
                ", ".join(sorted(needs.batch_keys())), _size(train_set), _size(val_set), rank, world_size)
    return train, val


def build_labelled_eval_loaders(data_cfg: DataConfig, image_size: int, patch_size: int, *, seed: int = 0,
                                rank: int = 0, world_size: int = 1) -> tuple[BeitLoader, BeitLoader]:
    """Both splits with class labels and the evaluation transform (no augmentation, no masks), this
    rank's shard of each: what representation checks (k-NN, linear probe) read, whatever the head
    trains on."""
    needs = DataNeeds()
    from beitdist.plugins import dataset_class

    plugin = dataset_class(data_cfg.dataset)
    options = parse(plugin.Options, data_cfg.options, "data.options")
    _, eval_tf = _transforms(data_cfg, needs, image_size, patch_size, seed, None)
    loaders = []
    for split in ("train", "val"):
        dataset = plugin.build(options, split, eval_tf)
        if dataset is None:
            raise InputError(f"dataset {data_cfg.dataset!r} has no {split} split with labels; representation checks "
                             "need both (set data.options)")
        loaders.append(_loader(dataset, eval_tf, Collate(), data_cfg, train=False,
                               batch_size=data_cfg.val_batch_size or data_cfg.batch_size, rank=rank,
                               world_size=world_size, seed=seed))
    return loaders[0], loaders[1]


def _size(dataset: Dataset | None) -> str:
    try:
        return str(len(dataset))  # type: ignore[arg-type]
    except TypeError:
        return "streamed" if dataset is not None else "no"
