"""Mixup / CutMix on a collated batch, with timm's `Mixup` semantics (mode "batch").

BEiT fine-tunes with mixup 0.8, cutmix 1.0, switch probability 0.5 and label smoothing 0.1, the
smoothing folded into the soft targets (the classification head then uses them as they are). One
lambda per batch, the partner of sample i is sample B-1-i (the batch flipped), CutMix boxes are
squares of side sqrt(1 - lambda) times the image side, centred uniformly and clipped at the border,
and lambda is corrected to the box area actually pasted. Randomness comes from the Generator passed
in; the pipeline derives it from (seed, epoch, first sample index of the batch), so a batch mixes the
same way whichever worker collates it.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from beitdist.errors import InputError

logger = logging.getLogger(__name__)


def smoothed_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """timm's one_hot with off = smoothing / C and on = 1 - smoothing + off (rows sum to 1)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, dtype=torch.float32)
    return out.scatter_(1, labels.long().view(-1, 1), 1.0 - smoothing + off)


def mixup_target(labels: torch.Tensor, num_classes: int, lam: float, smoothing: float = 0.0) -> torch.Tensor:
    y1 = smoothed_one_hot(labels, num_classes, smoothing)
    y2 = smoothed_one_hot(labels.flip(0), num_classes, smoothing)
    return y1 * lam + y2 * (1.0 - lam)


def cutmix_box(height: int, width: int, lam: float, rng: np.random.Generator
               ) -> tuple[tuple[int, int, int, int], float]:
    """timm's rand_bbox + lambda correction: ((y0, y1, x0, x1), corrected lambda)."""
    ratio = math.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * ratio), int(width * ratio)
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    y0, y1 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + cut_h // 2, 0, height))
    x0, x1 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + cut_w // 2, 0, width))
    return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)


class Mixup:
    """Batch-level mixup/cutmix: `__call__(pixel_values, labels, rng) -> (mixed, soft targets)`.

    With probability `prob` the batch is mixed; when both alphas are positive CutMix is chosen with
    probability `switch_prob`. Lambda ~ Beta(alpha, alpha) of the chosen method. Targets are always
    soft (B, num_classes) float32, label-smoothed even when the coin says no mixing, as in timm."""

    def __init__(self, num_classes: int, mixup_alpha: float = 0.8, cutmix_alpha: float = 1.0, prob: float = 1.0,
                 switch_prob: float = 0.5, label_smoothing: float = 0.1) -> None:
        if num_classes < 1:
            raise InputError(f"mixup needs the number of classes, got {num_classes}")
        if mixup_alpha <= 0 and cutmix_alpha <= 0:
            raise InputError("mixup needs mixup_alpha > 0 or cutmix_alpha > 0")
        self.num_classes, self.mixup_alpha, self.cutmix_alpha = num_classes, mixup_alpha, cutmix_alpha
        self.prob, self.switch_prob, self.label_smoothing = prob, switch_prob, label_smoothing

    def params(self, rng: np.random.Generator) -> tuple[float, bool]:
        """(lambda, use_cutmix) for one batch; lambda 1 means "not mixed"."""
        if rng.random() >= self.prob:
            return 1.0, False
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            use_cutmix = bool(rng.random() < self.switch_prob)
        else:
            use_cutmix = self.cutmix_alpha > 0
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        return float(rng.beta(alpha, alpha)), use_cutmix

    def __call__(self, pixel_values: torch.Tensor, labels: torch.Tensor, rng: np.random.Generator,
                 inplace: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`inplace=True` mixes into `pixel_values` itself (the collate's freshly stacked batch):
        one pass over the batch instead of a flipped copy and three temporaries, which made mixup
        cost a loader worker as much as decoding the JPEG."""
        if pixel_values.shape[0] % 2:
            logger.debug("mixup on an odd batch of %d: the middle sample is paired with itself", len(pixel_values))
        lam, use_cutmix = self.params(rng)
        x = pixel_values if inplace else pixel_values.clone()
        if lam < 1.0:
            if use_cutmix:
                (y0, y1, x0, x1), lam = cutmix_box(x.shape[-2], x.shape[-1], lam, rng)
                x[:, :, y0:y1, x0:x1] = x[:, :, y0:y1, x0:x1].flip(0)  # the right side is a copy of the box
            else:
                _mix_with_flipped_(x, lam)
        return x, mixup_target(labels, self.num_classes, lam, self.label_smoothing)


def _mix_with_flipped_(x: torch.Tensor, lam: float) -> None:
    """x[i] = lam * x[i] + (1 - lam) * x[B-1-i] for every i, in place, one pair at a time: only one
    sample is copied at once (it stays in cache), where `x * lam + x.flip(0) * (1 - lam)` writes
    four batch-sized tensors. The middle sample of an odd batch is its own partner: unchanged."""
    n = x.shape[0]
    for i in range(n // 2):
        j = n - 1 - i
        first = x[i].clone()
        x[i].lerp_(x[j], 1.0 - lam)
        x[j].lerp_(first, 1.0 - lam)
