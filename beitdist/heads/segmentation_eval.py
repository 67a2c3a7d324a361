"""Segmentation evaluation: whole-image and sliding-window inference (mmseg's test modes) and
mIoU / aAcc / mAcc from per-class areas.

The areas are float64 SUMS so ranks can all-reduce them and batches can be accumulated; the
ratios are only taken at the end (averaging per-batch mIoU would weight batches, not pixels).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from beitdist.errors import InputError

AREA_KEYS = ("area_intersect", "area_union", "area_label")


def resize_logits(logits: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear, align_corners=False (both references); a no-op at the same size."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


# ------------------------------------------------------------------ metrics
def intersect_and_union(
    pred: torch.Tensor, labels: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> dict[str, torch.Tensor]:
    """Per-class intersection, union and label areas (float64, shape (num_classes,)) over the
    pixels whose label is not `ignore_index`."""
    if pred.shape != labels.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and labels {tuple(labels.shape)} differ in shape")
    valid = labels != ignore_index
    pred, labels = pred[valid].long(), labels[valid].long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        bad = int(labels.min()) if int(labels.min()) < 0 else int(labels.max())
        raise InputError(f"label {bad} outside [0, {num_classes}) and not ignore_index {ignore_index}")

    def area(values: torch.Tensor) -> torch.Tensor:
        return torch.bincount(values, minlength=num_classes)[:num_classes].double()

    intersect = area(labels[pred == labels])
    area_pred, area_label = area(pred), area(labels)
    return {"area_intersect": intersect, "area_union": area_pred + area_label - intersect, "area_label": area_label}


def metrics_from_areas(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """mIoU over classes with a non-empty union, mAcc over classes present in the labels, aAcc
    over all labelled pixels (mmseg's definitions; NaN when nothing was labelled)."""
    intersect, union, label = (state[k].double().cpu() for k in AREA_KEYS)
    present, labelled = union > 0, label > 0
    nan = float("nan")
    return {
        "mIoU": float((intersect[present] / union[present]).mean()) if present.any() else nan,
        "mAcc": float((intersect[labelled] / label[labelled]).mean()) if labelled.any() else nan,
        "aAcc": float(intersect.sum() / label.sum()) if labelled.any() else nan,
    }


# ------------------------------------------------------------------ inference
def _logits(output: Any) -> torch.Tensor:
    return output if isinstance(output, torch.Tensor) else output.logits


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or min(pair) <= 0:
        raise InputError(f"{name}: expected a positive int or a pair, got {value!r}")
    return pair


@torch.no_grad()
def whole_inference(
    model: Callable[[torch.Tensor], Any], pixel_values: torch.Tensor, size: Sequence[int] | None = None
) -> torch.Tensor:
    """Logits (B, C, H, W) for whole images (mmseg's 'whole' mode), upsampled to the input size or
    to `size` (e.g. the original image's). The model must be in eval mode (BatchNorm)."""
    logits = _logits(model(pixel_values))
    return resize_logits(logits, size if size is not None else pixel_values.shape[-2:])


@torch.no_grad()
def slide_inference(
    model: Callable[[torch.Tensor], Any],
    pixel_values: torch.Tensor,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    num_classes: int,
) -> torch.Tensor:
    """Full-resolution logits (B, num_classes, H, W) from overlapping crops (mmseg's 'slide' mode;
    BEiT on ADE20K: crop 640, stride 426).

    Windows start every `stride` pixels, the last one is shifted back to end at the border; each
    crop's logits are upsampled to the crop and summed, then divided by how many crops covered
    each pixel. An image smaller than the crop is zero-padded (bottom/right) to the crop size and
    the padded part of the logits dropped, since BEiT only accepts its configured input size.
    """
    (crop_h, crop_w), (stride_h, stride_w) = _pair(crop, "crop"), _pair(stride, "stride")
    batch, _, height, width = pixel_values.shape
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    cols = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    summed = pixel_values.new_zeros((batch, num_classes, height, width), dtype=torch.float32)
    count = pixel_values.new_zeros((1, 1, height, width), dtype=torch.float32)
    for row in range(rows):
        for col in range(cols):
            y2, x2 = min(row * stride_h + crop_h, height), min(col * stride_w + crop_w, width)
            y1, x1 = max(y2 - crop_h, 0), max(x2 - crop_w, 0)
            window = pixel_values[:, :, y1:y2, x1:x2]
            h, w = window.shape[-2:]
            if (h, w) != (crop_h, crop_w):
                window = F.pad(window, (0, crop_w - w, 0, crop_h - h))
            logits = _logits(model(window))
            if logits.shape[1] != num_classes:
                raise InputError(f"model gives {logits.shape[1]} classes, num_classes is {num_classes}")
            summed[:, :, y1:y2, x1:x2] += resize_logits(logits.float(), (crop_h, crop_w))[:, :, :h, :w]
            count[:, :, y1:y2, x1:x2] += 1
    return summed / count


MS_SCALES = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
"""mmseg's (and unilm BEiT's ADE20K) multi-scale test ratios."""


@torch.no_grad()
def multiscale_flip_inference(
    model: Callable[[torch.Tensor], Any],
    pixel_values: torch.Tensor,
    crop: int | Sequence[int],
    stride: int | Sequence[int],
    num_classes: int,
    scales: Sequence[float] = MS_SCALES,
    flip: bool = True,
) -> torch.Tensor:
    """Log of the softmax probabilities averaged over scales and flips, at the input's size
    (mmseg's `aug_test`, unilm BEiT's `--aug-test`): the batch is resized (bilinear,
    align_corners=False) by each ratio of `scales`, run by sliding windows (BEiT takes only its
    configured input size), and again mirrored left-right; each probability map is resized back.
    mmseg resizes the original image to each ratio of the test scale; here the ratios apply to
    the evaluation input, which the validation transform already brought to the test scale.
    Returned as log-probabilities, so the argmax is the prediction and cross-entropy is the
    negative log-likelihood of the averaged prediction."""
    height, width = pixel_values.shape[-2:]
    total = pixel_values.new_zeros((pixel_values.shape[0], num_classes, height, width), dtype=torch.float32)
    views = 0
    for scale in scales:
        size = (max(1, int(height * scale + 0.5)), max(1, int(width * scale + 0.5)))
        scaled = pixel_values if size == (height, width) else F.interpolate(
            pixel_values, size=size, mode="bilinear", align_corners=False)
        for mirrored in ((False, True) if flip else (False,)):
            view = scaled.flip(-1) if mirrored else scaled
            logits = slide_inference(model, view, crop, stride, num_classes)
            if mirrored:
                logits = logits.flip(-1)
            total += resize_logits(logits, (height, width)).softmax(dim=1)
            views += 1
    return (total / views).clamp_min(torch.finfo(torch.float32).tiny).log()


def per_class_report(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Per-class IoU and accuracy (None for a class absent from both labels and predictions /
    from the labels), as mmseg's per-class table."""
    intersect, union, label = (state[k].double().cpu() for k in AREA_KEYS)
    return {
        "per_class_iou": [float(i / u) if u > 0 else None for i, u in zip(intersect, union)],
        "per_class_accuracy": [float(i / n) if n > 0 else None for i, n in zip(intersect, label)],
        "pixels_per_class": [int(n) for n in label],
    }
