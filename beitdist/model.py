"""A backbone plus (optionally) one head: the module users load, train and export."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from beitdist.backbone.beit import Beit
from beitdist.backbone.config import BackboneConfig
from beitdist.errors import InputError
from beitdist.heads.base import BackboneStates, Head, HeadOutput
from beitdist.outputs import ModelOutput


class BeitForTask(nn.Module):
    """`backbone` (a `Beit`) and `head` (a `Head` or None), wired by what the head `needs`."""

    def __init__(self, backbone: Beit, head: Head | None = None) -> None:
        super().__init__()
        if head is not None and head.pooling is not None and backbone.config.pooling not in head.pooling:
            raise InputError(
                f"head {head.name!r} needs backbone pooling in {list(head.pooling)}, "
                f"got {backbone.config.pooling!r}"
            )
        if head is not None and head.uses_mask and not backbone.config.use_mask_token:
            raise InputError(f"head {head.name!r} needs a backbone with use_mask_token=True")
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
        labels: torch.Tensor | None = None,
    ) -> ModelOutput:
        """`labels` (what the head's `loss` reads as `batch["labels"]`: class ids or soft targets,
        label maps, MIM target tokens) adds `.loss`, so loops written for transformers models
        (`transformers.Trainer`, a Lightning module returning `model(**batch).loss`) drive this
        model unchanged. beitdist's own training calls `loss` separately instead."""
        head = self.head
        if head is not None and head.needs == "pyramid":
            maps = self.backbone.forward_intermediates(pixel_values, head.block_indices, "NCHW", bool_masked_pos)
            result = _with_head_output(ModelOutput(None, None), head(maps, bool_masked_pos))
        elif head is not None and head.needs == "states":
            out = self.backbone(pixel_values, bool_masked_pos, output_hidden_states=True)
            assert out.hidden_states is not None
            result = ModelOutput(None, out.last_hidden_state, out.pooler_output,
                                 out.hidden_states if output_hidden_states else None)
            states = BackboneStates(out.hidden_states, self.backbone.shared_bias())
            result = _with_head_output(result, head(states, bool_masked_pos))
        else:
            out = self.backbone(pixel_values, bool_masked_pos, output_hidden_states=output_hidden_states)
            result = ModelOutput(None, out.last_hidden_state, out.pooler_output, out.hidden_states)
            if head is not None:
                features = out.pooler_output if head.needs == "pooled" else out.last_hidden_state
                result = _with_head_output(result, head(features, bool_masked_pos))
        if labels is not None:
            batch = {"pixel_values": pixel_values, "labels": labels}
            if bool_masked_pos is not None:
                batch["bool_masked_pos"] = bool_masked_pos
            result.loss = self.loss(result, batch)
        return result

    def loss(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.head is None:
            raise InputError("a bare backbone has no loss; build the model with a head")
        return self.head.loss(output, batch)

    # transformers' conventions, for users who bring code written for its models
    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, head: str | None = "auto", **kwargs: Any) -> BeitForTask:
        """`beitdist.load_model` (any checkpoint it reads: unilm, timm, transformers, beitdist, a
        training run); `head="auto"` keeps the checkpoint's own head. Local paths only: a Hub id
        is refused with a line saying how to fetch it."""
        from beitdist.checkpoint import load_model

        return load_model(path, head, **kwargs)

    def save_pretrained(self, out_dir: str | os.PathLike, *, overwrite: bool = False,
                        format: Literal["beitdist", "hf"] = "beitdist") -> Path:
        """`beitdist.save_checkpoint` (or `export_hf` with `format="hf"`, a directory transformers'
        own `from_pretrained` reads), with the same output rules: written atomically, an existing
        checkpoint replaced only with `overwrite=True`, anything else never touched."""
        from beitdist.checkpoint import export_hf, save_checkpoint

        if format not in ("beitdist", "hf"):
            raise InputError(f"save_pretrained: format must be 'beitdist' or 'hf', got {format!r}")
        writer = export_hf if format == "hf" else save_checkpoint
        return writer(self, out_dir, overwrite=overwrite)


def _with_head_output(result: ModelOutput, out: torch.Tensor | HeadOutput) -> ModelOutput:
    if isinstance(out, HeadOutput):
        result.logits, result.aux_logits = out.logits, out.aux_logits
    else:
        result.logits = out
    return result


def build_model(config: BackboneConfig, head: str | None = None, head_options: Any = None) -> BeitForTask:
    """A freshly initialised model; the backbone's pooling and mask token are set to what the head
    needs. `head` is resolved through the plugin registry, so third-party heads build the same way."""
    from beitdist.plugins import head_class

    head_cls = head_class(head) if head is not None else None
    if head_cls is not None:
        options = head_cls.parse_options(head_options)
        # a pyramid head reads intermediate blocks only: no final norm or pooler to leave unused
        allowed = head_cls.pooling or (("none",) if head_cls.needs == "pyramid" else None)
        if allowed is not None and config.pooling not in allowed:
            config = config.replace(pooling=allowed[0])
        if head_cls.uses_mask and not config.use_mask_token:
            config = config.replace(use_mask_token=True)
    backbone = Beit(config)
    head_module = head_cls(config, options) if head_cls else None
    if head_module is not None and head_module.needs == "pyramid":
        indices = tuple(head_module.block_indices)
        if not indices or not all(-config.depth <= i < config.depth for i in indices):
            raise InputError(
                f"head {head_module.name!r} needs the backbone's blocks {list(indices)}, but the backbone has "
                f"{config.depth} blocks (block_indices must be set in the head's constructor, 0-based)"
            )
    return BeitForTask(backbone, head_module)
