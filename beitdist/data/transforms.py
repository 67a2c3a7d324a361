"""Per-sample image transforms with the semantics of torchvision / timm / unilm, but explicit randomness.

torchvision's transforms draw from torch's global RNG, so the augmentation of a sample depends on
which DataLoader worker draws it and how many draws came before. Here every random transform takes
a `numpy.random.Generator` argument; the pipeline derives it from (seed, epoch, sample index) with
`sample_rngs`, which makes augmentations reproducible and independent of `num_workers`. The random
streams differ from torch's, so results match the reference implementations in distribution, not
draw for draw.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from beitdist.errors import InputError

IMAGENET_DEFAULT_MEAN = (0.485, 0.456, 0.406)
IMAGENET_DEFAULT_STD = (0.229, 0.224, 0.225)
"""unilm's `--imagenet_default_mean_and_std` (timm's IMAGENET_DEFAULT_*)."""
STANDARD_MEAN = (0.5, 0.5, 0.5)
STANDARD_STD = (0.5, 0.5, 0.5)
"""transformers' BeitImageProcessor (timm's IMAGENET_INCEPTION_*): maps [0, 1] to [-1, 1]."""
NORMALIZATION = {"imagenet": (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD), "standard": (STANDARD_MEAN, STANDARD_STD)}

INTERPOLATION = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def sample_rngs(seed: int, epoch: int, index: int, count: int = 2) -> list[np.random.Generator]:
    """Independent generators for one sample in one epoch (augmentation, mask, ...): a pure function
    of (seed, epoch, index), never of the worker that happens to load the sample."""
    # = SeedSequence(entropy).spawn(count) child by child, without building the parent (same streams)
    entropy = [int(seed), int(epoch), int(index)]
    return [np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy, spawn_key=(i,)))) for i in range(count)]


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [0, 1], as torchvision's ToTensor."""
    arr = np.asarray(img.convert("RGB") if img.mode != "RGB" else img, dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).div_(255.0)


def normalize(t: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    mean_t, std_t = _channel_constants(tuple(mean), tuple(std), t.dtype)
    return (t - mean_t) / std_t


@functools.lru_cache(maxsize=16)
def _channel_constants(mean: tuple[float, ...], std: tuple[float, ...], dtype: torch.dtype
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, 1, 1) tensors, made once per normalisation instead of twice per sample."""
    return (torch.tensor(mean, dtype=dtype).view(-1, 1, 1), torch.tensor(std, dtype=dtype).view(-1, 1, 1))


def _pair(size: int | Sequence[int]) -> tuple[int, int]:
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def rrc_params(width: int, height: int, scale: Sequence[float], ratio: Sequence[float],
               rng: np.random.Generator) -> tuple[int, int, int, int]:
    """torchvision/timm RandomResizedCrop.get_params: (top, left, h, w). Ten tries of an area fraction
    uniform in `scale` and a log-uniform aspect ratio; then a central crop clamped to `ratio`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = rng.uniform(scale[0], scale[1]) * area
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


class RandomResizedCrop:
    """timm's RandomResizedCropAndInterpolation, and with `second_size` unilm's
    RandomResizedCropAndInterpolationWithTwoPic: ONE region is cropped and resized twice, to `size`
    (bicubic) for the backbone and to `second_size` (lanczos) for the visual tokenizer, so that the
    tokenizer's targets describe exactly the pixels the backbone sees."""

    def __init__(self, size: int | Sequence[int], scale: Sequence[float] = (0.08, 1.0),
                 ratio: Sequence[float] = (3 / 4, 4 / 3), interpolation: str = "bicubic",
                 second_size: int | Sequence[int] | None = None, second_interpolation: str = "lanczos") -> None:
        if scale[0] > scale[1] or ratio[0] > ratio[1] or scale[0] <= 0 or ratio[0] <= 0:
            raise InputError(f"scale and ratio must be positive (min, max) ranges, got {scale} and {ratio}")
        self.size = _pair(size)
        self.second_size = None if second_size is None else _pair(second_size)
        self.scale, self.ratio = tuple(scale), tuple(ratio)
        self.interpolation = INTERPOLATION[interpolation]
        self.second_interpolation = INTERPOLATION[second_interpolation]

    def params(self, img: Image.Image, rng: np.random.Generator) -> tuple[int, int, int, int]:
        return rrc_params(img.width, img.height, self.scale, self.ratio, rng)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image | tuple[Image.Image, Image.Image]:
        top, left, h, w = self.params(img, rng)
        region = img.crop((left, top, left + w, top + h))  # crop first, as torchvision: no pixels from outside
        first = region.resize(self.size[::-1], self.interpolation)
        if self.second_size is None:
            return first
        return first, region.resize(self.second_size[::-1], self.second_interpolation)


def random_hflip(img: Image.Image, rng: np.random.Generator, p: float = 0.5) -> Image.Image:
    """torchvision's RandomHorizontalFlip: flip when a uniform draw is below p."""
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < p else img


class ColorJitter:
    """torchvision's ColorJitter on PIL images (hue is not supported; BEiT never uses it): factors
    uniform in [max(0, 1 - v), 1 + v], applied in a random order with PIL's ImageEnhance, as
    torchvision's PIL backend does."""

    def __init__(self, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4) -> None:
        for name, value in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if value < 0:
                raise InputError(f"ColorJitter {name} must be >= 0, got {value}")
        self.values = (brightness, contrast, saturation)
        self.enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        order = rng.permutation(3)
        factors = [rng.uniform(max(0.0, 1 - v), 1 + v) if v > 0 else None for v in self.values]
        for i in order:
            if factors[i] is not None:
                img = self.enhancers[i](img).enhance(float(factors[i]))
        return img


class RandomErasing:
    """timm's RandomErasing on a normalised (C, H, W) tensor: with probability p, erase `count`
    rectangles (area fraction uniform in [min_area, max_area] divided by the count, log-uniform aspect
    in [min_aspect, 1/min_aspect], ten tries each, strictly inside the image) with per-pixel normal
    noise ("pixel"), one normal colour per channel ("rand") or zeros ("const")."""

    def __init__(self, probability: float = 0.25, mode: str = "pixel", count: int = 1,
                 min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3) -> None:
        if mode not in ("pixel", "rand", "const"):
            raise InputError(f"RandomErasing mode must be 'pixel', 'rand' or 'const', got {mode!r}")
        if not 0.0 <= probability <= 1.0 or count < 1:
            raise InputError(f"RandomErasing needs 0 <= probability <= 1 and count >= 1, got {probability}, {count}")
        self.probability, self.mode, self.count = probability, mode, count
        self.min_area, self.max_area = min_area, max_area
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def boxes(self, height: int, width: int, rng: np.random.Generator) -> list[tuple[int, int, int, int]]:
        """The (top, left, h, w) rectangles one call erases (empty when the coin says no)."""
        if rng.random() > self.probability:
            return []
        count = int(rng.integers(1, self.count + 1)) if self.count > 1 else self.count
        out = []
        for _ in range(count):
            for _attempt in range(10):
                target = rng.uniform(self.min_area, self.max_area) * height * width / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h = int(round(math.sqrt(target * aspect)))
                w = int(round(math.sqrt(target / aspect)))
                if w < width and h < height:
                    out.append((int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w))
                    break
        return out

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        chans, height, width = x.shape
        for top, left, h, w in self.boxes(height, width, rng):
            if self.mode == "pixel":
                fill = rng.standard_normal((chans, h, w), dtype=np.float32)
            elif self.mode == "rand":
                fill = np.broadcast_to(rng.standard_normal((chans, 1, 1), dtype=np.float32), (chans, h, w))
            else:
                fill = np.zeros((chans, h, w), dtype=np.float32)
            x[:, top : top + h, left : left + w] = torch.from_numpy(np.ascontiguousarray(fill)).to(x.dtype)
        return x
