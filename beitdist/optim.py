"""AdamW parameter groups with BEiT's layer-wise lr decay, and per-iteration lr / wd schedules.

One builder serves every engine (DeepSpeed, fairscale, plain PyTorch): groups are plain dicts with
`lr_scale` and `apply_wd` keys, and `apply_schedule(optimizer, step)` sets each group's `lr` and
`weight_decay` before every optimizer step, as unilm does (cosine lr AND cosine wd, stepped per
iteration; poly for segmentation).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from beitdist.schema import check


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 1e-3
    """Peak learning rate for the whole (global) batch of the recipe."""
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    weight_decay_end: float | None = None
    """Cosine weight-decay schedule end value (unilm); None keeps weight_decay constant."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    layer_decay: float = 1.0
    """Layer-wise lr decay: scale = layer_decay ** (L + 1 - layer_id); 1.0 disables."""
    schedule: Literal["cosine", "poly", "constant"] = "cosine"
    poly_power: float = 1.0
    warmup_steps: int = 0
    warmup_start_lr: float = 0.0
    clip_grad: float = 3.0
    """Gradient clipping by global norm; 0 disables (always written to DeepSpeed's config)."""
    rel_pos_weight_decay: bool = False
    """unilm exempts relative-position tables from weight decay; True applies it."""

    def __post_init__(self) -> None:
        check(self.lr > 0, "lr", f"expected > 0, got {self.lr}")
        check(0 <= self.min_lr <= self.lr, "min_lr", f"expected 0 <= min_lr <= lr, got {self.min_lr}")
        check(self.weight_decay >= 0, "weight_decay", f"expected >= 0, got {self.weight_decay}")
        check(0 < self.layer_decay <= 1, "layer_decay", f"expected a value in (0, 1], got {self.layer_decay}")
        check(self.warmup_steps >= 0, "warmup_steps", f"expected >= 0, got {self.warmup_steps}")
        check(self.clip_grad >= 0, "clip_grad", f"expected >= 0 (0 disables), got {self.clip_grad}")
        check(all(0 <= b < 1 for b in self.betas), "betas", f"expected values in [0, 1), got {self.betas}")


def _shape(param: torch.Tensor) -> tuple[int, ...]:
    # Under ZeRO-3 a partitioned parameter is an empty placeholder; its real shape is ds_shape.
    return tuple(getattr(param, "ds_shape", param.shape))


def layer_scales(num_layer_ids: int, layer_decay: float) -> list[float]:
    """lr scale for each layer id 0 .. L + 1: layer_decay ** (L + 1 - id)."""
    return [layer_decay ** (num_layer_ids - 1 - i) for i in range(num_layer_ids)]


def param_groups(model: nn.Module, config: OptimConfig) -> list[dict[str, Any]]:
    """AdamW groups keyed by (layer id, decay or not), unilm's rules.

    No weight decay for 1-D parameters, biases, the backbone's `no_weight_decay()` set (cls token,
    absolute position embedding, relative-position tables unless `rel_pos_weight_decay`, the head's
    own tables too). Layer ids
    come from `backbone.layer_id`; head parameters get the last id (scale 1).
    """
    backbone: Any = model.backbone  # a Beit (its layer ids and no-decay set)
    num_ids: int = backbone.num_layer_ids
    scales = layer_scales(num_ids, config.layer_decay)
    skip = {f"backbone.{n}" for n in backbone.no_weight_decay(rel_pos_tables=not config.rel_pos_weight_decay)}
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("backbone."):
            layer_id = backbone.layer_id(name.removeprefix("backbone."))
        else:
            layer_id = num_ids - 1
        # a head's own blocks (BEiT v2's aggregation stack) follow the backbone's rule for their tables
        head_table = not config.rel_pos_weight_decay and name.endswith("relative_position_bias_table")
        decay = not (len(_shape(param)) == 1 or name.endswith(".bias") or name in skip or head_table)
        key = (layer_id, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "names": [],
                "layer_id": layer_id,
                "lr_scale": scales[layer_id],
                "apply_wd": decay,
                "weight_decay": config.weight_decay if decay else 0.0,
                "lr": config.lr * scales[layer_id],
            }
        groups[key]["params"].append(param)
        groups[key]["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def optimizer_groups(groups: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Groups without the `names` lists (optimizers keep extra keys; names would bloat checkpoints)."""
    return [{k: v for k, v in g.items() if k != "names"} for g in groups]


@dataclass(frozen=True)
class Schedule:
    """Per-iteration lr and weight-decay values over `total_steps` optimizer steps."""

    config: OptimConfig
    total_steps: int

    def lr(self, step: int) -> float:
        c = self.config
        if step < c.warmup_steps:
            return c.warmup_start_lr + (c.lr - c.warmup_start_lr) * step / c.warmup_steps
        if c.schedule == "constant":
            return c.lr
        span = max(self.total_steps - c.warmup_steps, 1)
        progress = min(max(step - c.warmup_steps, 0) / span, 1.0)
        if c.schedule == "poly":
            return (c.lr - c.min_lr) * (1.0 - progress) ** c.poly_power + c.min_lr
        return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1.0 + math.cos(math.pi * progress))

    def weight_decay(self, step: int) -> float:
        c = self.config
        if c.weight_decay_end is None:
            return c.weight_decay
        progress = min(max(step, 0) / max(self.total_steps, 1), 1.0)
        return c.weight_decay_end + 0.5 * (c.weight_decay - c.weight_decay_end) * (1.0 + math.cos(math.pi * progress))


def apply_schedule(optimizer: torch.optim.Optimizer, schedule: Schedule, step: int) -> float:
    """Set every group's lr and weight decay for optimizer step `step`; returns the base lr."""
    lr, wd = schedule.lr(step), schedule.weight_decay(step)
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
        group["weight_decay"] = wd if group.get("apply_wd", True) else 0.0
    return lr


def adamw_options(config: OptimConfig) -> dict[str, Any]:
    """AdamW's defaults (each group's own lr and weight decay are set by `apply_schedule`)."""
    return {"lr": config.lr, "betas": config.betas, "eps": config.eps}


def build_adamw(groups: list[dict[str, Any]], config: OptimConfig) -> torch.optim.Optimizer:
    """torch AdamW over the layer-decay groups, the one optimizer every engine starts from:
    DeepSpeed takes it as its client optimizer (or builds its CPU Adam over the same groups and
    options, `beitdist.engines.deepspeed.optim`), fairscale wraps the same AdamW in OSS
    (`beitdist.engines.fairscale.engine`)."""
    return torch.optim.AdamW(optimizer_groups(groups), **adamw_options(config))
