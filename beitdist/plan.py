"""Per-rank memory planning: model states under each ZeRO stage and offload, plus activations.

Model states follow the ZeRO paper's accounting for AdamW: weights, gradients and two moments,
with fp32 master weights under mixed precision (16 bytes a parameter in every precision), divided
over the ranks by the stage: 1 partitions the optimizer states, 2 also the gradients, 3 also the
weights. Activations are what autograd keeps per block for a BEiT block (a standard transformer
count: ~16 N D values plus 2 H N^2 attention maps per block and sample), or only the block inputs
plus one block when activation checkpointing is on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from beitdist.backbone.config import BackboneConfig

GIB = 1024**3
OVERHEAD = 1.15
"""Allocator fragmentation, communication buckets and workspace, as a factor on the total."""


@dataclass(frozen=True)
class MemoryPlan:
    stage: int
    offload_optimizer: bool
    offload_params: bool
    params: int
    weights: float
    gradients: float
    optimizer: float
    activations: float
    cpu: float
    """Bytes each rank keeps in host memory (offloaded states)."""

    @property
    def device_total(self) -> float:
        return (self.weights + self.gradients + self.optimizer + self.activations) * OVERHEAD

    def describe(self) -> str:
        name = f"ZeRO-{self.stage}" + (" +opt offload" if self.offload_optimizer else "") + (
            " +param offload" if self.offload_params else "")
        return (f"{name:28} weights {self.weights / GIB:6.2f}  grads {self.gradients / GIB:6.2f}  "
                f"optim {self.optimizer / GIB:6.2f}  activ {self.activations / GIB:6.2f}  "
                f"=> {self.device_total / GIB:6.2f} GiB/rank (host {self.cpu / GIB:.2f} GiB)")


def count_parameters(config: BackboneConfig, head: str | None, head_options: object = None) -> int:
    """Exact parameter count of the model the recipe builds (on the meta device: no memory)."""
    from beitdist.model import build_model

    with torch.device("meta"):
        model = build_model(config, head, head_options)
    return sum(p.numel() for p in model.parameters())


def activation_bytes(config: BackboneConfig, batch: int, precision: str, checkpointing: bool) -> float:
    tokens, dim, heads = config.num_patches + 1, config.embed_dim, config.num_heads
    mlp = config.hidden_mlp_dim
    per_block = tokens * (8 * dim + 2 * mlp) + 2 * heads * tokens * tokens
    size = 4 if precision == "fp32" else 2
    if checkpointing:
        values = config.depth * tokens * dim + per_block
    else:
        values = config.depth * per_block
    return float(values * batch * size)


def plan(params: int, world: int, stage: int, precision: str, offload_optimizer: bool = False,
         offload_params: bool = False, activations: float = 0.0) -> MemoryPlan:
    half = precision != "fp32"
    weights = params * (2 if half else 4)
    grads = params * (2 if half else 4)
    optim = params * (12 if half else 8)  # fp32 master copy (mixed precision) + two moments
    if stage >= 1:
        optim /= world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights /= world
    cpu = 0.0
    if offload_optimizer:
        cpu += optim
        optim = 0.0
    if offload_params and stage == 3:
        cpu += weights
        weights = 0.0
    return MemoryPlan(stage, offload_optimizer, offload_params, params, weights, grads, optim, activations, cpu)


SETTINGS = ((0, False, False), (1, False, False), (2, False, False), (2, True, False), (3, False, False),
            (3, True, False), (3, True, True))


def all_plans(params: int, world: int, precision: str, activations: float) -> list[MemoryPlan]:
    return [plan(params, world, s, precision, oo, op, activations) for s, oo, op in SETTINGS]


def smallest_fit(plans: list[MemoryPlan], device_bytes: float) -> MemoryPlan | None:
    """The first setting (least sharding and offload, so the fastest) that fits the device."""
    return next((p for p in plans if p.device_total <= device_bytes), None)
