"""What a batch must contain for a head: declared by the head (`Head.data_needs`), read by the data
pipeline to pick the per-sample transforms and the collate.

The pipeline asks the head for this declaration and never for its name, so a third-party head
gets the batches it declares exactly as a built-in one does. Every batch has "pixel_values"
(B, 3, S, S) float32; the declaration adds:

- `labels="class"`: "labels" (B,) long class ids, or (B, C) float soft targets when mixup/cutmix
  is on; classification augmentation (RandAugment, RandomErasing, mixup/cutmix).
- `labels="map"`: "labels" (B, S, S) long label maps, 255 = ignore; segmentation augmentation.
- `labels=None`: nothing from the dataset's targets; BEiT's pretraining augmentation (colour jitter,
  flip, one random resized crop), plus what `mask` and `tokenizer` ask for:
  - `mask`: "bool_masked_pos" (B, N) bool, BEiT's blockwise mask over the patch grid
    (`data.mask_ratio`, `data.num_masking_patches`, ...);
  - `tokenizer`: "tokenizer_pixels" (B, 3, T, T) in [0, 1], the same crop at the tokenizer's input
    size; the recipe must name a tokenizer, and the training loop turns this view into "labels"
    (visual tokens) before the head sees the batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Labels = Literal["class", "map"]
LABELS: tuple[str | None, ...] = ("class", "map", None)


@dataclass(frozen=True)
class DataNeeds:
    """What a head reads from a batch (see the module docstring for the batch layouts)."""

    labels: Labels | None = "class"
    """"class" (one class id per image), "map" (a label map per image) or None (no labels)."""
    mask: bool = False
    """Blockwise "bool_masked_pos" (with labels None)."""
    tokenizer: bool = False
    """A "tokenizer_pixels" view for the recipe's tokenizer, whose tokens become "labels" (with labels None)."""

    def __post_init__(self) -> None:
        if self.labels not in LABELS:
            raise ValueError(f"DataNeeds.labels must be one of 'class', 'map', None; got {self.labels!r}")
        if self.labels is not None and (self.mask or self.tokenizer):
            raise ValueError(
                f"DataNeeds(labels={self.labels!r}) cannot also ask for a mask or a tokenizer view: the data "
                "pipeline draws masks and tokenizer views with the pretraining augmentation (labels=None) only")

    def batch_keys(self) -> frozenset[str]:
        """The keys of the batches the data pipeline delivers (before the training loop adds tokens)."""
        keys = {"pixel_values"}
        if self.labels is not None:
            keys.add("labels")
        if self.mask:
            keys.add("bool_masked_pos")
        if self.tokenizer:
            keys.add("tokenizer_pixels")
        return frozenset(keys)
