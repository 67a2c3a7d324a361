"""Image classification head: pooled vector -> Linear, initialised as unilm does (scale 0.001)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from beitdist.backbone.config import BackboneConfig
from beitdist.backbone.layers import init_linear_
from beitdist.heads.base import Head


class ClassificationHead(Head):
    name = "classification"
    needs = "pooled"
    pooling = ("mean", "cls")

    def __init__(
        self, backbone: BackboneConfig, num_classes: int = 1000, init_scale: float = 0.001, dropout: float = 0.0
    ) -> None:
        super().__init__(backbone)
        if not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"head.num_classes: expected a positive int, got {num_classes!r}")
        self.num_classes = num_classes
        self.init_scale = init_scale
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(backbone.embed_dim, num_classes)
        init_linear_(self.classifier, scale=init_scale)

    def options(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "init_scale": self.init_scale, "dropout": self.dropout.p}

    def forward(self, features: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(features))
