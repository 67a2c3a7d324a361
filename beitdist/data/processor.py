"""Preprocessing that reproduces transformers' BEiT image processor (PIL backend) value for value.

Checkpoints fine-tuned with transformers saw inputs made by `BeitImageProcessor`; another filter or
rounding quietly costs accuracy, so each step copies its arithmetic (PIL resampling on uint8, float64
rescale then float32, normalisation in float32) without importing transformers, under the same keyword
names. Where transformers 5.x does something harmful we differ by default, each with a switch back:

- images that are not RGB (grey, RGBA, palette) are converted like transformers' `convert_to_rgb`
  (`do_convert_rgb=True`); transformers leaves that off and then fails in normalisation;
- label maps are resized with NEAREST (`label_resample`); transformers 5.x reuses the image filter
  (BICUBIC), which invents class ids along region borders. `label_resample=None` restores that;
- 2-D arrays are accepted as grey images, and the caller's label arrays are never edited in place.
"""

from __future__ import annotations

import logging
import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from beitdist.errors import InputError

logger = logging.getLogger(__name__)

IMAGENET_STANDARD_MEAN = (0.5, 0.5, 0.5)
IMAGENET_STANDARD_STD = (0.5, 0.5, 0.5)
_SIZE_KEYS = ({"height", "width"}, {"shortest_edge"})
_OPTIONS = ("do_resize", "size", "resample", "do_center_crop", "crop_size", "do_rescale", "rescale_factor",
            "do_normalize", "image_mean", "image_std", "do_reduce_labels", "do_convert_rgb", "label_resample")
_ALLOWED = ("a PIL.Image.Image, a numpy array or a torch tensor shaped (H, W), (H, W, C) or (C, H, W) "
            "with C in (1, 3, 4), a batch of those stacked on a leading axis, or a non-empty list of them")


class ProcessedBatch(dict):
    """A dict with attribute access, so code written against transformers' BatchFeature keeps working."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError as err:
            raise AttributeError(name) from err

    def to(self, device: torch.device | str) -> ProcessedBatch:
        return ProcessedBatch({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in self.items()})


def _size_dict(size: Any, name: str) -> dict[str, int]:
    """Accept the forms transformers accepts (int means square for BEiT) so configs copy over as-is."""
    if isinstance(size, int):
        return {"height": size, "width": size}
    if isinstance(size, (tuple, list)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    if isinstance(size, dict) and set(size) in _SIZE_KEYS:
        return {k: int(v) for k, v in size.items()}
    keys = " or ".join(str(sorted(k)) for k in _SIZE_KEYS)
    raise InputError(f"{name} must be an int, a (height, width) pair or a dict with keys {keys}; got {size!r}")


def _output_size(h: int, w: int, size: dict[str, int]) -> tuple[int, int]:
    """transformers' get_resize_output_image_size: the long side is truncated, not rounded."""
    if "height" in size:
        return size["height"], size["width"]
    s = size["shortest_edge"]
    return (int(s * h / w), s) if w <= h else (s, int(s * w / h))


def _resize(chw: np.ndarray, hw: tuple[int, int], resample: int) -> np.ndarray:
    """PIL resizes 8-bit data only; like transformers, [0, 1] floats go through x255 and truncation."""
    scaled = False
    if chw.dtype != np.uint8 and np.allclose(chw, chw.astype(int)) and chw.min() >= 0 and chw.max() <= 255:
        chw = chw.astype(np.uint8)
    elif chw.dtype != np.uint8 and np.issubdtype(chw.dtype, np.floating) and chw.min() >= 0 and chw.max() <= 1:
        chw, scaled = (chw.astype(np.float64) * 255).astype(np.float32).astype(np.uint8), True
    elif chw.dtype != np.uint8:
        raise InputError(f"cannot resize values in [{chw.min()}, {chw.max()}] ({chw.dtype}): resizing goes through "
                         "8-bit PIL images, so values must be integers in [0, 255] or floats in [0, 1]")
    hwc = np.moveaxis(chw, 0, -1)
    out = np.array(Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc).resize((hw[1], hw[0]), resample))
    out = np.moveaxis(out[..., None] if out.ndim == 2 else out, -1, 0)
    return (out.astype(np.float64) * (1 / 255)).astype(np.float32) if scaled else out


def _center_crop(chw: np.ndarray, ch: int, cw: int) -> np.ndarray:
    """Crop, zero-padding first when the image is smaller than the crop, as transformers does."""
    h, w = chw.shape[-2:]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return chw[..., top : top + ch, left : left + cw]
    nh, nw = max(ch, h), max(cw, w)
    canvas = np.zeros_like(chw, shape=chw.shape[:-2] + (nh, nw))
    tp, lp = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas[..., tp : tp + h, lp : lp + w] = chw
    top, left = top + tp, left + lp
    return canvas[..., max(0, top) : min(nh, top + ch), max(0, left) : min(nw, left + cw)]


def _as_numpy(item: Any, what: str) -> np.ndarray:
    if isinstance(item, torch.Tensor):
        item = item.detach().cpu()
        return (item.float() if item.dtype == torch.bfloat16 else item).numpy()
    if isinstance(item, np.ndarray):
        return item
    raise InputError(f"{what}: got {type(item).__name__}; expected {_ALLOWED}")


def _flatten(items: Any, ndims: int, what: str) -> list[Any]:
    """One flat list from an item, a stacked batch (one more axis) or (nested) lists of either."""
    if isinstance(items, (list, tuple)):
        if not items:
            raise InputError(f"{what}: got an empty {type(items).__name__}; expected {_ALLOWED}")
        return [one for item in items for one in _flatten(item, ndims, what)]
    if isinstance(items, Image.Image):
        return [items]
    arr = _as_numpy(items, what)
    if arr.ndim == ndims + 1:
        return list(items)
    if 2 <= arr.ndim <= ndims:
        return [items]
    raise InputError(f"{what}: got an array of shape {tuple(arr.shape)}; expected {_ALLOWED}")


def _image_chw(image: Any, convert_rgb: bool) -> np.ndarray:
    """Channels-first array; non-RGB input goes through transformers' `convert_to_rgb` rules."""
    if isinstance(image, Image.Image):
        if convert_rgb and ("A" in image.getbands() or image.info.get("transparency") is not None):
            white = Image.new("RGBA", image.size, (255, 255, 255, 255))
            image = Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
        elif convert_rgb:
            image = image.convert("RGB")
        arr = np.array(image)
        arr = arr[None] if arr.ndim == 2 else np.moveaxis(arr, -1, 0)
    else:
        arr = _as_numpy(image, "images")
        if arr.ndim == 2:
            arr = arr[None]
        elif arr.shape[0] not in (1, 3, 4):  # channels-first wins ties, as in transformers
            if arr.shape[-1] not in (1, 3, 4):
                raise InputError(f"images: cannot find a channel axis of size 1, 3 or 4 in shape {arr.shape}; "
                                 f"expected {_ALLOWED}")
            arr = np.moveaxis(arr, -1, 0)
        if convert_rgb and arr.shape[0] == 1:
            arr = np.repeat(arr, 3, axis=0)
        elif convert_rgb and arr.shape[0] == 4:
            if np.issubdtype(arr.dtype, np.floating) and (arr.min() < 0.0 or arr.max() > 1.0):
                raise InputError(f"images: a float RGBA image must lie in [0, 1]; got [{arr.min()}, {arr.max()}]")
            top = 255 if np.issubdtype(arr.dtype, np.integer) else 1.0
            alpha = arr[3:4] / top  # composite onto white, as transformers does
            comp = alpha * arr[:3] + (1 - alpha) * top
            arr = np.round(comp).astype(arr.dtype) if top == 255 else comp.astype(arr.dtype)
    if arr.shape[0] != 3:
        raise InputError(f"images: got {arr.shape[0]} channels (channels-first shape {arr.shape}); the model "
                         "needs 3 (RGB). Pass do_convert_rgb=True to convert grey (1) and RGBA (4) images")
    return arr


class ImageProcessor:
    """Drop-in for transformers' `BeitImageProcessor`: same keyword names, defaults and output values."""

    def __init__(self, *, do_resize: bool = True, size: Any = None, resample: int | None = None,
                 do_center_crop: bool = False, crop_size: Any = None, do_rescale: bool = True,
                 rescale_factor: float = 1 / 255, do_normalize: bool = True,
                 image_mean: float | tuple[float, ...] | None = None,
                 image_std: float | tuple[float, ...] | None = None,
                 do_reduce_labels: bool = False, do_convert_rgb: bool | None = True,
                 label_resample: int | None = Image.Resampling.NEAREST) -> None:
        # None means "the default", as in transformers, so a saved config with nulls loads the same way.
        self.do_resize, self.do_center_crop, self.do_rescale = do_resize, do_center_crop, do_rescale
        self.size = _size_dict(224 if size is None else size, "size")
        self.crop_size = _size_dict(224 if crop_size is None else crop_size, "crop_size")
        self.resample = Image.Resampling.BICUBIC if resample is None else resample
        self.rescale_factor, self.do_normalize = rescale_factor, do_normalize
        self.image_mean = IMAGENET_STANDARD_MEAN if image_mean is None else image_mean
        self.image_std = IMAGENET_STANDARD_STD if image_std is None else image_std
        self.do_reduce_labels, self.label_resample = do_reduce_labels, label_resample
        self.do_convert_rgb = True if do_convert_rgb is None else do_convert_rgb
        self._warned_rescaled = False

    @classmethod
    def from_dict(cls, config: dict[str, Any]) -> ImageProcessor:
        """Build from a transformers `preprocessor_config.json` dict; keys we do not use are ignored."""
        return cls(**{k: v for k, v in config.items() if k in _OPTIONS})

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in _OPTIONS}

    def _options(self, overrides: dict[str, Any]) -> SimpleNamespace:
        unknown = sorted(set(overrides) - set(_OPTIONS))
        if unknown:
            raise InputError(f"unknown option(s) {unknown}; allowed: {list(_OPTIONS)}")
        opts = SimpleNamespace(**{**self.to_dict(), **overrides})
        opts.size, opts.crop_size = _size_dict(opts.size, "size"), _size_dict(opts.crop_size, "crop_size")
        if opts.do_center_crop and "height" not in opts.crop_size:
            raise InputError(f"crop_size must give height and width; got {opts.crop_size}")
        for name in ("image_mean", "image_std"):
            if np.ndim(getattr(opts, name)) > 1 or np.size(getattr(opts, name)) not in (1, 3):
                raise InputError(f"{name} must be one number or one per RGB channel; got {getattr(opts, name)!r}")
        return opts

    def _geometry(self, chw: np.ndarray, o: SimpleNamespace, resample: int) -> np.ndarray:
        if o.do_resize:
            height, width = chw.shape[-2:]
            chw = _resize(chw, _output_size(height, width, o.size), resample)
        if o.do_center_crop:
            chw = _center_crop(chw, o.crop_size["height"], o.crop_size["width"])
        return chw

    def _pixels(self, image: Any, o: SimpleNamespace) -> np.ndarray:
        arr = _image_chw(image, o.do_convert_rgb)
        if o.do_rescale and np.issubdtype(arr.dtype, np.floating) and arr.min() >= 0 and arr.max() <= 1:
            if not self._warned_rescaled:  # once per processor: a data loader would repeat it per image
                logger.warning("image values already lie in [0, 1] and do_rescale=True scales them again by "
                               "rescale_factor (transformers does the same); pass do_rescale=False if unintended")
            self._warned_rescaled = True
        arr = self._geometry(arr, o, o.resample)
        if o.do_rescale:
            arr = (arr.astype(np.float64) * o.rescale_factor).astype(np.float32)
        if o.do_normalize:
            arr = arr if np.issubdtype(arr.dtype, np.floating) else arr.astype(np.float32)
            mean, std = (np.resize(np.asarray(v, dtype=arr.dtype), 3) for v in (o.image_mean, o.image_std))
            arr = (arr - mean[:, None, None]) / std[:, None, None]
        return arr.astype(np.float32)

    def _labels(self, seg: Any, o: SimpleNamespace) -> np.ndarray:
        arr = np.array(seg) if isinstance(seg, Image.Image) else _as_numpy(seg, "segmentation_maps").copy()
        if arr.ndim != 2:
            raise InputError(f"segmentation_maps: each must be a 2-D (H, W) array of class ids; got {arr.shape}")
        if o.do_reduce_labels:  # transformers' exact steps: 0 -> 255, others - 1, 255 stays 255
            arr[arr == 0] = 255
            arr = arr - 1
            arr[arr == 254] = 255
        resample = o.resample if o.label_resample is None else o.label_resample
        return self._geometry(arr[None], o, resample)[0].astype(np.int64)

    def preprocess(self, images: Any, segmentation_maps: Any = None, return_tensors: str | None = "pt",
                   **overrides: Any) -> ProcessedBatch:
        """`pixel_values` (B, 3, H, W) float32, with maps `labels` (B, H, W) int64; options override per call."""
        if return_tensors not in ("pt", "np", None):
            raise InputError(f"return_tensors must be 'pt', 'np' or None; got {return_tensors!r}")
        o = self._options(overrides)
        data = {"pixel_values": [self._pixels(img, o) for img in _flatten(images, 3, "images")]}
        if segmentation_maps is not None:
            maps = _flatten(segmentation_maps, 2, "segmentation_maps")
            if len(maps) != len(data["pixel_values"]):
                raise InputError(f"got {len(data['pixel_values'])} images but {len(maps)} segmentation maps")
            data["labels"] = [self._labels(seg, o) for seg in maps]
        if return_tensors is None:
            return ProcessedBatch(data)
        if len({a.shape for a in data["pixel_values"]}) > 1:
            raise InputError("images came out in different sizes and cannot be stacked; use a fixed "
                             "size, do_center_crop=True or return_tensors=None")
        stack = torch.from_numpy if return_tensors == "pt" else np.asarray
        return ProcessedBatch({k: stack(np.stack(v)) for k, v in data.items()})

    __call__ = preprocess

    def post_process_semantic_segmentation(self, outputs: Any,
                                           target_sizes: list[tuple[int, int]] | torch.Tensor | None = None
                                           ) -> list[torch.Tensor]:
        """Per-image (H, W) class-id maps; logits are resized bilinearly *before* argmax, as transformers does."""
        logits = outputs if isinstance(outputs, torch.Tensor) else outputs.logits
        if target_sizes is None:
            return list(logits.argmax(dim=1))
        if len(target_sizes) != len(logits):
            raise InputError(f"got {len(target_sizes)} target sizes for a batch of {len(logits)} logits")
        return [F.interpolate(logits[i][None], size=tuple(int(v) for v in size), mode="bilinear",
                              align_corners=False)[0].argmax(dim=0) for i, size in enumerate(target_sizes)]
