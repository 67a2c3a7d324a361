"""Masked image modeling head: LayerNorm -> Linear over the visual-token vocabulary."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from beitdist.backbone.config import BackboneConfig
from beitdist.backbone.layers import init_linear_
from beitdist.heads.base import Head


class MimHead(Head):
    """Predicts the visual token of every patch (B, N, vocab). unilm's pretraining model keeps its
    final norm next to `lm_head`; here that norm is `head.norm`, so the backbone runs with
    pooling 'none' (no norm of its own) exactly as in unilm."""

    name = "mim"
    needs = "tokens"
    pooling = ("none", "cls")
    uses_mask = True

    def __init__(self, backbone: BackboneConfig, vocab_size: int = 8192) -> None:
        super().__init__(backbone)
        if not isinstance(vocab_size, int) or vocab_size <= 1:
            raise ValueError(f"head.vocab_size: expected an int > 1, got {vocab_size!r}")
        self.vocab_size = vocab_size
        self.norm = nn.LayerNorm(backbone.embed_dim, eps=backbone.layer_norm_eps)
        self.lm_head = nn.Linear(backbone.embed_dim, vocab_size)
        init_linear_(self.lm_head)

    def options(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size}

    def forward(self, features: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        return self.lm_head(self.norm(features[:, 1:]))
