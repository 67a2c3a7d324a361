"""Per-sample transforms for each kind of batch a head can declare (`beitdist.data.needs`): the
recipes of unilm (classification fine-tuning, MIM pretraining) and mmseg (BEiT's ADE20K config)
for training; `ImageProcessor` for evaluation.

Every transform is called as `transform(image, target, index)` (the DatasetPlugin contract) and
draws all its randomness from generators derived from (seed, epoch, index), so augmentation is
reproducible and independent of the DataLoader worker count. The epoch is set with `set_epoch`
before each pass (the pipeline does it before creating the DataLoader iterator, so worker
processes receive the current value).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

import numpy as np
import torch
from PIL import Image

from beitdist.data.augment import rand_augment
from beitdist.data.processor import ImageProcessor
from beitdist.data.seg_transforms import PhotoMetricDistortion, pad_to, random_crop, random_flip, random_rescale
from beitdist.data.transforms import (
    INTERPOLATION,
    NORMALIZATION,
    ColorJitter,
    RandomErasing,
    RandomResizedCrop,
    normalize,
    random_hflip,
    sample_rngs,
    to_tensor,
)
from beitdist.errors import InputError

if TYPE_CHECKING:
    from beitdist.data.pipeline import AugmentConfig


class SampleTransform:
    """Holds the run's seed and the current epoch; `rngs(index)` are the sample's generators."""

    def __init__(self, seed: int) -> None:
        self.seed, self.epoch = int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def rngs(self, index: int, count: int = 2) -> list[np.random.Generator]:
        return sample_rngs(self.seed, self.epoch, index, count)

    def __call__(self, image: Image.Image, target: Any, index: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError


def _label(target: Any) -> torch.Tensor:
    if target is None:
        raise InputError("the head needs class labels (data_needs.labels \"class\"), but the dataset gave none")
    return torch.tensor(int(target), dtype=torch.long)


class ClassificationTrain(SampleTransform):
    """timm's transforms_imagenet_train as unilm's fine-tuning calls it: RandomResizedCrop (bicubic),
    flip, RandAugment (colour jitter only without RandAugment, or when forced, as timm), to tensor,
    normalise, RandomErasing."""

    def __init__(self, image_size: int, aug: AugmentConfig, seed: int) -> None:
        super().__init__(seed)
        self.mean, self.std = NORMALIZATION[aug.normalization]
        self.hflip = aug.hflip
        self.crop = RandomResizedCrop(image_size, aug.scale, aug.ratio, aug.interpolation)
        self.rand_augment = rand_augment(aug.rand_augment, self.mean, aug.interpolation) if aug.rand_augment else None
        jitter = aug.color_jitter and (self.rand_augment is None or aug.force_color_jitter)
        strength = aug.color_jitter or 0.0
        self.color_jitter = ColorJitter(strength, strength, strength) if jitter else None
        self.erasing = RandomErasing(aug.reprob, aug.remode, aug.recount) if aug.reprob > 0 else None

    def __call__(self, image: Image.Image, target: Any, index: int) -> dict[str, torch.Tensor]:
        (rng,) = self.rngs(index, 1)
        img = cast(Image.Image, self.crop(image, rng))  # one view: no second_size in this transform
        if self.hflip > 0:
            img = random_hflip(img, rng, self.hflip)
        if self.rand_augment is not None:
            img = self.rand_augment(img, rng)
        if self.color_jitter is not None:
            img = self.color_jitter(img, rng)
        x = normalize(to_tensor(img), self.mean, self.std)
        if self.erasing is not None:
            x = self.erasing(x, rng)
        return {"pixel_values": x, "labels": _label(target)}


def masking_generator(image_size: int, patch_size: int, num_masking_patches: int | None, mask_ratio: float,
                      min_per_block: int | None, max_per_block: int | None) -> Any:
    """unilm's blockwise generator for the patch grid (75 of 196 patches, blocks >= 16 at 224/16)."""
    from beitdist.data.masking import MaskingGenerator, min_num_patches_for, num_masking_patches_for

    grid = image_size // patch_size
    count = num_masking_patches if num_masking_patches is not None else num_masking_patches_for(grid, mask_ratio)
    minimum = min_per_block if min_per_block is not None else min_num_patches_for(grid, count)
    return MaskingGenerator(grid, count, minimum, max_per_block)


def _mask_tensor(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask).reshape(-1))


class MimTrain(SampleTransform):
    """unilm's DataAugmentationForBEiT, for every head without labels (MIM, masked pixel
    regression, ...): colour jitter, flip, then ONE random crop, resized bicubic to the backbone
    size and normalised; with `tokenizer_size`, the same crop resized again (lanczos) to the
    tokenizer size, kept in [0, 1] (the tokenizer applies its own pixel mapping); with `masks`, a
    blockwise mask `bool_masked_pos` (N,) from the sample's second generator."""

    def __init__(self, image_size: int, tokenizer_size: int | None, aug: AugmentConfig, masks: Any, seed: int) -> None:
        super().__init__(seed)
        self.mean, self.std = NORMALIZATION[aug.normalization]
        self.hflip, self.masks = aug.hflip, masks
        jitter = aug.color_jitter
        self.color_jitter = ColorJitter(jitter, jitter, jitter) if jitter else None
        self.crop = RandomResizedCrop(image_size, aug.scale, aug.ratio, aug.interpolation,
                                      second_size=tokenizer_size, second_interpolation=aug.tokenizer_interpolation)

    def __call__(self, image: Image.Image, target: Any, index: int) -> dict[str, torch.Tensor]:
        rng, mask_rng = self.rngs(index, 2)
        if self.color_jitter is not None:
            image = self.color_jitter(image, rng)
        if self.hflip > 0:
            image = random_hflip(image, rng, self.hflip)
        views = self.crop(image, rng)
        main, second = views if isinstance(views, tuple) else (views, None)
        out = {"pixel_values": normalize(to_tensor(main), self.mean, self.std)}
        if second is not None:
            out["tokenizer_pixels"] = to_tensor(second)
        if self.masks is not None:
            out["bool_masked_pos"] = _mask_tensor(self.masks(mask_rng))
        return out


class SegmentationTrain(SampleTransform):
    """mmseg: random rescale (ratio range of a (4S, S) base scale), random crop with cat_max_ratio,
    flip, photometric distortion, normalise, pad to S x S with label 255."""

    def __init__(self, image_size: int, aug: AugmentConfig, seed: int) -> None:
        super().__init__(seed)
        self.size = (image_size, image_size)
        self.mean, self.std = NORMALIZATION[aug.normalization]
        self.base_scale = tuple(aug.seg_base_scale) if aug.seg_base_scale else (4 * image_size, image_size)
        self.ratio_range, self.cat_max_ratio, self.hflip = aug.seg_ratio_range, aug.cat_max_ratio, aug.hflip
        self.photometric = PhotoMetricDistortion() if aug.photometric else None

    def __call__(self, image: Image.Image, target: Any, index: int) -> dict[str, torch.Tensor]:
        if target is None:
            raise InputError("segmentation needs label maps, but the dataset gave none")
        (rng,) = self.rngs(index, 1)
        labels = np.asarray(target)
        image, labels = random_rescale(image, labels, self.base_scale, self.ratio_range, rng)
        image, labels = random_crop(image, labels, self.size, self.cat_max_ratio, rng)
        if self.hflip > 0:
            image, labels = random_flip(image, labels, rng, self.hflip)
        if self.photometric is not None:
            image = self.photometric(image, rng)
        pixels, labels_t = pad_to(normalize(to_tensor(image), self.mean, self.std), labels, self.size)
        return {"pixel_values": pixels, "labels": labels_t}


def eval_processor(image_size: int, aug: AugmentConfig, resample: str | None = None, normalized: bool = True
                   ) -> ImageProcessor:
    """Resize to image_size x image_size (transformers' BEiT eval), or with `eval_crop_pct` timm's
    resize-shorter-side-to-S/crop_pct + centre crop."""
    mean, std = NORMALIZATION[aug.normalization]
    kwargs: dict[str, Any] = {"size": image_size}
    if aug.eval_crop_pct is not None:
        kwargs = {"size": {"shortest_edge": int(image_size / aug.eval_crop_pct)}, "do_center_crop": True,
                  "crop_size": image_size}
    return ImageProcessor(resample=INTERPOLATION[resample or aug.interpolation], image_mean=mean, image_std=std,
                          do_normalize=normalized, **kwargs)


class Eval(SampleTransform):
    """Deterministic: `ImageProcessor` for pixels, and class labels or (`labels="map"`) label maps
    resized with NEAREST."""

    def __init__(self, image_size: int, aug: AugmentConfig, labels: str) -> None:
        super().__init__(0)
        self.processor, self.labels = eval_processor(image_size, aug), labels

    def __call__(self, image: Image.Image, target: Any, index: int) -> dict[str, torch.Tensor]:
        if self.labels == "map":
            out = self.processor(image, segmentation_maps=np.asarray(target))
            return {"pixel_values": out["pixel_values"][0], "labels": out["labels"][0]}
        return {"pixel_values": self.processor(image)["pixel_values"][0], "labels": _label(target)}


class MimEval(SampleTransform):
    """MimTrain's views resized without randomness; masks depend on the index only (epoch fixed at
    0), so every evaluation scores the same masked positions."""

    def __init__(self, image_size: int, tokenizer_size: int | None, aug: AugmentConfig, masks: Any, seed: int) -> None:
        super().__init__(seed)
        self.main = eval_processor(image_size, aug)
        self.second = None
        if tokenizer_size is not None:
            self.second = eval_processor(tokenizer_size, aug, resample=aug.tokenizer_interpolation, normalized=False)
        self.masks = masks

    def set_epoch(self, epoch: int) -> None:
        self.epoch = 0

    def __call__(self, image: Image.Image, target: Any, index: int) -> dict[str, torch.Tensor]:
        out = {"pixel_values": self.main(image)["pixel_values"][0]}
        if self.second is not None:
            out["tokenizer_pixels"] = self.second(image)["pixel_values"][0]
        if self.masks is not None:
            (mask_rng,) = self.rngs(index, 1)
            out["bool_masked_pos"] = _mask_tensor(self.masks(mask_rng))
        return out
