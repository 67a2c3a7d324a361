"""RandAugment with timm's semantics (`rand_augment_transform`), BEiT's "rand-m9-mstd0.5-inc1".

BEiT fine-tunes with timm's RandAugment, which differs from the paper and from torchvision's in ways
that matter for reproducing the published numbers, so each is kept here:

- two ops per image, drawn uniformly WITH replacement from 15 ops (timm leaves Cutout out: random
  erasing does that job after normalisation); every chosen op is then applied with probability 0.5;
- the magnitude is redrawn per applied op from N(m, mstd) and clipped to [0, 10];
- "inc1" picks the variants whose strength increases with the magnitude (posterize keeps fewer bits,
  solarize a lower threshold, colour/contrast/brightness/sharpness move further from 1 either way);
- geometric ops and enhancements negate their argument with probability 0.5; translations are
  relative (up to 45% of the image side); gaps are filled with the normalisation mean in 0-255 and
  resampled with the training interpolation (bicubic for BEiT).

Randomness comes from the numpy Generator passed in (see `transforms.sample_rngs`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from beitdist.data.transforms import INTERPOLATION
from beitdist.errors import InputError

LEVEL_DENOM = 10.0
RAND_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd", "Color",
            "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
RAND_INCREASING_OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
                       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                       "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")


def _negate(v: float, rng: np.random.Generator) -> float:
    return -v if rng.random() > 0.5 else v


def _affine(img: Image.Image, data: tuple[float, ...], fill: tuple[int, ...], resample: int) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, data, resample=resample, fillcolor=fill)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep `bits` high bits. 0 bits (magnitude 10 of the increasing variant) made old Pillow return
    black; Pillow >= 10 refuses it (which breaks timm there), so the black image is made here."""
    if bits >= 8:
        return img
    if bits <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits)


# level (0..10) -> op argument, as timm's _*_level_to_arg functions
def _enhance_level(m: float, rng: np.random.Generator) -> float:
    return m / LEVEL_DENOM * 1.8 + 0.1


def _enhance_increasing_level(m: float, rng: np.random.Generator) -> float:
    return max(0.1, 1.0 + _negate(m / LEVEL_DENOM * 0.9, rng))


_ENHANCERS = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
              "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}


@dataclass(frozen=True)
class AugmentOp:
    """One RandAugment op: applied with probability `prob`, magnitude noise `magnitude_std`."""

    name: str
    magnitude: float
    magnitude_std: float = 0.0
    prob: float = 0.5
    fill: tuple[int, ...] = (128, 128, 128)
    resample: int = Image.Resampling.BICUBIC

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        if self.prob < 1.0 and rng.random() > self.prob:
            return img
        m = self.magnitude
        if self.magnitude_std == float("inf"):
            m = rng.uniform(0, m)
        elif self.magnitude_std > 0:
            m = rng.normal(m, self.magnitude_std)
        m = max(0.0, min(m, LEVEL_DENOM))
        return self.apply(img, m, rng)

    def apply(self, img: Image.Image, m: float, rng: np.random.Generator) -> Image.Image:
        name = self.name
        base = name.removesuffix("Increasing")
        if name == "AutoContrast":
            return ImageOps.autocontrast(img)
        if name == "Equalize":
            return ImageOps.equalize(img)
        if name == "Invert":
            return ImageOps.invert(img)
        if name == "Rotate":
            return img.rotate(_negate(m / LEVEL_DENOM * 30.0, rng), resample=Image.Resampling(self.resample),
                              fillcolor=self.fill)
        if name == "Posterize":
            return _posterize(img, int(m / LEVEL_DENOM * 4))
        if name == "PosterizeIncreasing":
            return _posterize(img, 4 - int(m / LEVEL_DENOM * 4))
        if name == "Solarize":
            return ImageOps.solarize(img, int(m / LEVEL_DENOM * 256))
        if name == "SolarizeIncreasing":
            return ImageOps.solarize(img, 256 - int(m / LEVEL_DENOM * 256))
        if name == "SolarizeAdd":
            return _solarize_add(img, int(m / LEVEL_DENOM * 110))
        if base in _ENHANCERS:
            factor = _enhance_increasing_level(m, rng) if name.endswith("Increasing") else _enhance_level(m, rng)
            return _ENHANCERS[base](img).enhance(factor)
        if name in ("ShearX", "ShearY"):
            f = _negate(m / LEVEL_DENOM * 0.3, rng)
            data: tuple[float, ...] = (1, f, 0, 0, 1, 0) if name == "ShearX" else (1, 0, 0, f, 1, 0)
            return _affine(img, data, self.fill, self.resample)
        if name in ("TranslateXRel", "TranslateYRel"):
            pct = _negate(m / LEVEL_DENOM * 0.45, rng)
            data = (1, 0, pct * img.width, 0, 1, 0) if name == "TranslateXRel" else (1, 0, 0, 0, 1, pct * img.height)
            return _affine(img, data, self.fill, self.resample)
        raise InputError(f"unknown RandAugment op {name!r}")


class RandAugment:
    """`num_layers` ops drawn uniformly with replacement, each applied as its AugmentOp says."""

    def __init__(self, ops: Sequence[AugmentOp], num_layers: int = 2) -> None:
        self.ops, self.num_layers = list(ops), num_layers

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        for i in rng.integers(0, len(self.ops), size=self.num_layers):
            img = self.ops[int(i)](img, rng)
        return img

    def __repr__(self) -> str:
        return f"RandAugment(n={self.num_layers}, ops={[op.name for op in self.ops]})"


def rand_augment(config: str, mean: Sequence[float] = (0.485, 0.456, 0.406),
                 interpolation: str = "bicubic") -> RandAugment:
    """Parse a timm config string ("rand-m9-mstd0.5-inc1"): m = magnitude (default 10), n = ops per
    image (2), mstd = magnitude noise (> 100 means uniform in [0, m]), inc = increasing variants.
    `mean` (the normalisation mean, 0-1) gives the fill colour, as timm's `img_mean` hparam."""
    parts = config.split("-")
    if parts[0] != "rand":
        raise InputError(f"RandAugment config must start with 'rand-', got {config!r} (e.g. 'rand-m9-mstd0.5-inc1')")
    magnitude, num_layers, mstd, ops = LEVEL_DENOM, 2, 0.0, RAND_OPS
    for part in parts[1:]:
        match = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if match is None:
            raise InputError(f"cannot parse RandAugment section {part!r} of {config!r}")
        key, val = match.groups()
        if key == "m":
            magnitude = float(int(val))
        elif key == "n":
            num_layers = int(val)
        elif key == "mstd":
            mstd = float(val) if float(val) <= 100 else float("inf")
        elif key == "inc":
            ops = RAND_INCREASING_OPS if int(val) else RAND_OPS
        else:
            raise InputError(f"unknown RandAugment section {part!r} in {config!r}; allowed: m, n, mstd, inc")
    fill = tuple(min(255, round(255 * v)) for v in mean)
    resample = INTERPOLATION[interpolation]
    return RandAugment([AugmentOp(name, magnitude, mstd, 0.5, fill, resample) for name in ops], num_layers)
