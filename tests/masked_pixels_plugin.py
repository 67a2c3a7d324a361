"""A third-party head for the tests: masked pixel regression (SimMIM-style, L1 on the masked
patches' normalised pixels), whose data needs (a mask, no labels, no tokenizer) are declared only
through its class. Registered for one test with `beitdist.plugins.register(this module)`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

import beitdist
from beitdist.heads import DataNeeds, KeyMap


@dataclass(frozen=True)
class MaskedPixelsOptions:
    pass


def patchify(pixels: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, patch * patch * C), patches row-major like the backbone's."""
    b, c, _, _ = pixels.shape
    x = pixels.unfold(2, patch, patch).unfold(3, patch, patch)  # B, C, h, w, p, p
    return x.permute(0, 2, 3, 4, 5, 1).reshape(b, -1, patch * patch * c)


class MaskedPixelsHead(beitdist.Head):
    name = "masked_pixels"
    Options = MaskedPixelsOptions
    needs = "tokens"
    pooling = ("none",)
    uses_mask = True
    data_needs = DataNeeds(labels=None, mask=True)
    unilm_keys = KeyMap((("decoder", "head.decoder"),))

    def __init__(self, backbone, options=None):
        super().__init__(backbone, options)
        self.patch = backbone.patch_size
        self.decoder = torch.nn.Linear(backbone.embed_dim, self.patch * self.patch * backbone.in_chans)

    def forward(self, features, bool_masked_pos=None):
        return self.decoder(features[:, 1:])

    def _masked(self, output, batch):
        mask = batch["bool_masked_pos"].bool()
        return output.logits.float()[mask], patchify(batch["pixel_values"], self.patch)[mask]

    def loss(self, output, batch):
        prediction, target = self._masked(output, batch)
        return F.l1_loss(prediction, target) if target.numel() else output.logits.sum() * 0.0

    def metric_state(self, output, batch):
        prediction, target = self._masked(output, batch)
        return {"abs_error": (prediction - target).abs().sum().double(),
                "count": torch.tensor(float(target.numel()), dtype=torch.float64)}

    def compute_metrics(self, state):
        return {"masked_l1": float(state["abs_error"]) / max(float(state["count"]), 1.0)}


@beitdist.hookimpl
def beitdist_register_heads(registry) -> None:
    registry.add(MaskedPixelsHead)
