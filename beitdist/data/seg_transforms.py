"""Segmentation training augmentation: mmseg's pipeline of BEiT's ADE20K UperNet config.

    Resize(img_scale=(4S, S), ratio_range=(0.5, 2.0))  keep the aspect ratio, bilinear / nearest
    RandomCrop(crop_size=(S, S), cat_max_ratio=0.75)     retry up to 10 times while one class dominates
    RandomFlip(prob=0.5)
    PhotoMetricDistortion()                              brightness, contrast, saturation, hue
    Normalize -> Pad(size=(S, S), pad_val=0, seg_pad_val=255)

Image and label map go through the same geometry (labels always with NEAREST, so no class id is
invented at region borders); padding uses 255, the ignore index. Two knowing differences from mmcv:
PIL's bilinear filter antialiases when shrinking (cv2's does not), and HSV is PIL's 8-bit HSV (hue
in 1/256 turns instead of OpenCV's 2-degree units; the shift is converted). Randomness comes from
the numpy Generator passed in.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

IGNORE_INDEX = 255


def _resize_labels(labels: np.ndarray, size_wh: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(labels.astype(np.int32)).resize(size_wh, Image.Resampling.NEAREST)).astype(
        labels.dtype)


def random_rescale(image: Image.Image, labels: np.ndarray, base_scale: Sequence[int], ratio_range: Sequence[float],
                   rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """mmseg Resize(img_scale, ratio_range, keep_ratio=True): scale the (long, short) bound by a
    uniform ratio, then fit the image inside it (mmcv.imrescale: sizes rounded half up)."""
    ratio = rng.random() * (ratio_range[1] - ratio_range[0]) + ratio_range[0]
    long_edge, short_edge = max(base_scale) * ratio, min(base_scale) * ratio
    long_edge, short_edge = int(long_edge), int(short_edge)
    w, h = image.size
    factor = min(long_edge / max(h, w), short_edge / min(h, w))
    size = (max(1, int(w * factor + 0.5)), max(1, int(h * factor + 0.5)))
    return image.resize(size, Image.Resampling.BILINEAR), _resize_labels(labels, size)


def _crop_box(height: int, width: int, crop: tuple[int, int], rng: np.random.Generator) -> tuple[int, int, int, int]:
    top = int(rng.integers(0, max(height - crop[0], 0) + 1))
    left = int(rng.integers(0, max(width - crop[1], 0) + 1))
    return top, min(top + crop[0], height), left, min(left + crop[1], width)


def random_crop(image: Image.Image, labels: np.ndarray, crop: tuple[int, int], cat_max_ratio: float,
                rng: np.random.Generator, ignore_index: int = IGNORE_INDEX) -> tuple[Image.Image, np.ndarray]:
    """mmseg RandomCrop: a crop of at most `crop` (h, w); while one class (ignoring 255) covers
    `cat_max_ratio` or more of it, draw again, ten times at most, keeping the last draw."""
    box = _crop_box(labels.shape[0], labels.shape[1], crop, rng)
    if cat_max_ratio < 1.0:
        for _ in range(10):
            values, counts = np.unique(labels[box[0] : box[1], box[2] : box[3]], return_counts=True)
            counts = counts[values != ignore_index]
            if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
                break
            box = _crop_box(labels.shape[0], labels.shape[1], crop, rng)
    top, bottom, left, right = box
    return image.crop((left, top, right, bottom)), labels[top:bottom, left:right]


def random_flip(image: Image.Image, labels: np.ndarray, rng: np.random.Generator, p: float = 0.5
                ) -> tuple[Image.Image, np.ndarray]:
    if rng.random() < p:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), labels[:, ::-1]
    return image, labels


class PhotoMetricDistortion:
    """mmseg PhotoMetricDistortion: each step with probability 1/2 — brightness + U(-32, 32);
    contrast x U(0.5, 1.5) (before or after the colour steps, at random); saturation x U(0.5, 1.5);
    hue + randint(-18, 18) OpenCV units — each result clipped to 0-255 as uint8."""

    def __init__(self, brightness_delta: int = 32, contrast_range: Sequence[float] = (0.5, 1.5),
                 saturation_range: Sequence[float] = (0.5, 1.5), hue_delta: int = 18) -> None:
        self.brightness_delta, self.hue_delta = brightness_delta, hue_delta
        self.contrast_range, self.saturation_range = tuple(contrast_range), tuple(saturation_range)

    @staticmethod
    def _convert(arr: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
        return np.clip(arr.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)

    def _contrast(self, arr: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self._convert(arr, alpha=rng.uniform(self.contrast_range[0], self.contrast_range[1])) if rng.integers(2) else arr

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> Image.Image:
        arr = np.asarray(image.convert("RGB"))
        if rng.integers(2):
            arr = self._convert(arr, beta=rng.uniform(-self.brightness_delta, self.brightness_delta))
        contrast_first = bool(rng.integers(2))
        if contrast_first:
            arr = self._contrast(arr, rng)
        do_saturation = bool(rng.integers(2))
        saturation = rng.uniform(self.saturation_range[0], self.saturation_range[1]) if do_saturation else 1.0
        do_hue = bool(rng.integers(2))
        hue = int(rng.integers(-self.hue_delta, self.hue_delta)) if do_hue else 0
        if do_saturation or do_hue:
            hsv = np.asarray(Image.fromarray(arr).convert("HSV")).copy()
            if do_saturation:
                hsv[..., 1] = self._convert(hsv[..., 1], alpha=saturation)
            if do_hue:  # OpenCV hue units are 2 degrees (0..179); PIL's are 360/256 degrees
                shift = int(round(hue * 256 / 180))
                hsv[..., 0] = ((hsv[..., 0].astype(np.int32) + shift) % 256).astype(np.uint8)
            arr = np.asarray(Image.fromarray(hsv, mode="HSV").convert("RGB"))
        if not contrast_first:
            arr = self._contrast(arr, rng)
        return Image.fromarray(np.ascontiguousarray(arr))


def pad_to(pixels: torch.Tensor, labels: np.ndarray, size: tuple[int, int], ignore_index: int = IGNORE_INDEX
           ) -> tuple[torch.Tensor, torch.Tensor]:
    """mmseg Pad(size, pad_val=0, seg_pad_val=255) at the bottom and right, after normalisation."""
    chans, h, w = pixels.shape
    out = torch.zeros((chans, size[0], size[1]), dtype=pixels.dtype)
    out[:, :h, :w] = pixels
    lab = torch.full(size, ignore_index, dtype=torch.long)
    lab[:h, :w] = torch.from_numpy(np.ascontiguousarray(labels)).long()
    return out, lab
