"""A backbone plus (optionally) one head: the module users load, train and export."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from beitdist.backbone.beit import Beit
from beitdist.backbone.config import BackboneConfig
from beitdist.heads import Head, head_class


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    """The head's output; None for a bare backbone."""
    last_hidden_state: torch.Tensor | None
    """(B, 1 + N, D) final tokens (None for heads that only read intermediate blocks)."""
    pooler_output: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None


class BeitForTask(nn.Module):
    """`backbone` (a `Beit`) and `head` (a `Head` or None), wired by what the head `needs`."""

    def __init__(self, backbone: Beit, head: Head | None = None) -> None:
        super().__init__()
        if head is not None and head.pooling is not None and backbone.config.pooling not in head.pooling:
            raise ValueError(
                f"head {head.name!r} needs backbone pooling in {list(head.pooling)}, "
                f"got {backbone.config.pooling!r}"
            )
        if head is not None and head.uses_mask and not backbone.config.use_mask_token:
            raise ValueError(f"head {head.name!r} needs a backbone with use_mask_token=True")
        self.backbone = backbone
        self.head = head

    @property
    def config(self) -> BackboneConfig:
        return self.backbone.config

    @property
    def head_name(self) -> str | None:
        return None if self.head is None else self.head.name

    def forward(
        self,
        pixel_values: torch.Tensor,
        bool_masked_pos: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> ModelOutput:
        head = self.head
        if head is not None and head.needs == "pyramid":
            maps = self.backbone.forward_intermediates(pixel_values, head.block_indices, "NCHW", bool_masked_pos)
            return ModelOutput(logits=head(maps), last_hidden_state=None)
        out = self.backbone(pixel_values, bool_masked_pos, output_hidden_states=output_hidden_states)
        logits = None
        if head is not None:
            features = out.pooler_output if head.needs == "pooled" else out.last_hidden_state
            logits = head(features, bool_masked_pos)
        return ModelOutput(logits, out.last_hidden_state, out.pooler_output, out.hidden_states)


def build_model(
    config: BackboneConfig, head: str | None = None, head_options: dict[str, Any] | None = None
) -> BeitForTask:
    """A freshly initialised model; the backbone's pooling and mask token are set to what the head needs."""
    head_cls = head_class(head) if head is not None else None
    if head_cls is not None:
        if head_cls.pooling is not None and config.pooling not in head_cls.pooling:
            config = config.replace(pooling=head_cls.pooling[0])
        if head_cls.uses_mask and not config.use_mask_token:
            config = config.replace(use_mask_token=True)
    backbone = Beit(config)
    return BeitForTask(backbone, head_cls(config, **(head_options or {})) if head_cls else None)
