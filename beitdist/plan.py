"""Per-rank memory planning: model states under each ZeRO stage and offload, buffers and activations.

Model states are counted the way DeepSpeed holds them (and the way its own estimators,
`estimate_zero2_model_states_mem_needs` / `estimate_zero3_model_states_mem_needs`, count them),
per parameter before partitioning:

    working weights   2 B (bf16/fp16) or 4 B (fp32)    partitioned by ZeRO-3
    working gradients 2 B or 4 B                       partitioned by ZeRO-2 and -3
    fp32 master       4 B, see below                   partitioned by ZeRO-1, -2, -3
    fp32 gradients    4 B under mixed precision        partitioned by ZeRO-1, -2, -3
    AdamW moments     8 B                              partitioned by ZeRO-1, -2, -3

so mixed precision costs 20 B a parameter unpartitioned, not the ZeRO paper's 16: DeepSpeed casts
the reduced gradient partition to fp32 before the step. In fp32 there is no separate fp32 gradient;
the master copy exists where DeepSpeed makes one: ZeRO-1/2 always clone their partition
(stage_1_and_2.py: `weights_partition = ...clone()`), ZeRO-3 reuses an fp32 partition as its own
master (stage3.py: "we don't need another copy"), plain DDP steps the model's own weights, and an
offloaded optimizer always keeps its own copy on the host. fp32 ZeRO-3 is therefore 16 B / world.

With the optimizer offloaded (DeepSpeed ZeRO-Offload) master, fp32 gradients and moments live on
the host and, from ZeRO-2 on, the gradient partition goes straight into the host buffer; parameter
offload (ZeRO-3) moves the weight partition there too. ZeRO-3 also gathers a layer at a time: the
largest layer's weights and gradients, unpartitioned (DeepSpeed's `4 * largest_layer_params`).

Beyond DeepSpeed's estimators, the device total adds what a run of beitdist's config really holds:
the gradient bucket (`reduce_bucket_size` of beitdist's DeepSpeed config; DDP's all-reduce flattens
up to DeepSpeed's `allreduce_bucket_size` at once), the parameters ZeRO-3 keeps gathered between
forward and backward (up to `stage3_max_live_parameters`, 1e9 by default: all of a BEiT-L), the
activations, and a factor for allocator fragmentation and workspace.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from beitdist.backbone.config import BackboneConfig

GIB = 1024**3
OVERHEAD = 1.15
"""Allocator fragmentation, communication copies and workspace, as a factor on the device total."""
ALLREDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default `allreduce_bucket_size` (DDP, ZeRO-0): gradients are flattened this many at a time."""
MAX_LIVE_PARAMETERS = 1_000_000_000
"""DeepSpeed's default `stage3_max_live_parameters`, used when beitdist's config leaves it unset."""
SETTINGS = ((0, False, False), (1, False, False), (2, False, False), (2, True, False), (3, False, False),
            (3, True, False), (3, True, True))
"""(stage, offload optimizer, offload params), fastest first (DeepSpeed's own ordering in its
"how to choose a ZeRO stage" guide)."""


class ParameterCount(int):
    """A parameter count that also knows the largest single module's own parameters (DeepSpeed's
    `largest_layer_params`), so callers that only pass the count on still get ZeRO-3's gathered
    layer right."""

    largest_layer: int
    trainable: int
    """Parameters the optimizer holds (all but `model.freeze`): only these have gradients and
    optimizer states."""

    def __new__(cls, total: int, largest_layer: int = 0, trainable: int | None = None) -> ParameterCount:
        count = super().__new__(cls, total)
        count.largest_layer = int(largest_layer)
        count.trainable = int(total if trainable is None else trainable)
        return count


@dataclass(frozen=True)
class StateBytes:
    """Bytes of each model state per parameter, before partitioning (see the module docstring)."""

    weights: int
    gradients: int
    master: int
    fp32_gradients: int
    moments: int = 8

    @property
    def optimizer(self) -> int:
        """What ZeRO-1 partitions and ZeRO-Offload moves to the host."""
        return self.master + self.fp32_gradients + self.moments


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
    gathered: float = 0.0
    """ZeRO-3: the largest layer's weights and gradients, gathered whole (DeepSpeed's convention)."""
    buffers: float = 0.0
    """Gradient bucket and the parameters ZeRO-3 keeps gathered: real, but outside DeepSpeed's estimate."""

    @property
    def name(self) -> str:
        return f"ZeRO-{self.stage}" + (" +opt offload" if self.offload_optimizer else "") + (
            " +param offload" if self.offload_params else "")

    @property
    def model_states(self) -> float:
        """Device bytes of weights, gradients and optimizer states: what DeepSpeed's estimators
        report per GPU."""
        return self.weights + self.gradients + self.optimizer + self.gathered

    @property
    def device_total(self) -> float:
        return (self.model_states + self.buffers + self.activations) * OVERHEAD

    def describe(self) -> str:
        return (f"{self.name:36} weights {self.weights / GIB:6.2f}  grads {self.gradients / GIB:6.2f}  "
                f"optim {self.optimizer / GIB:6.2f}  buffers {(self.gathered + self.buffers) / GIB:5.2f}  "
                f"activ {self.activations / GIB:6.2f}  => {self.device_total / GIB:6.2f} GiB/rank "
                f"(host {self.cpu / GIB:.2f} GiB)")


def count_parameters(config: BackboneConfig, head: str | None, head_options: object = None,
                     freeze: Sequence[str] = ()) -> ParameterCount:
    """Exact parameter count of the model the recipe builds (on the meta device: no memory), with
    its largest layer counted the way DeepSpeed's `model_to_params` does, and how many of them
    train once the `freeze` patterns (`model.freeze`) are applied."""
    from beitdist.freeze import frozen_names
    from beitdist.model import build_model

    with torch.device("meta"):
        model = build_model(config, head, head_options)
    params = dict(model.named_parameters())
    total = sum(p.numel() for p in params.values())
    frozen = sum(params[name].numel() for name in frozen_names(list(params), freeze)) if freeze else 0
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    return ParameterCount(total, largest, total - frozen)


def activation_bytes(config: BackboneConfig, batch: int, precision: str, checkpointing: bool) -> float:
    """What autograd keeps for backward. Per block and sample, as counted with saved-tensor hooks on
    beitdist's own block (SDPA with the relative-position bias as a float mask, which saves the
    attention probabilities): 10 N D values (block input, two norm outputs, q/k/v, attention output,
    projection, residual, MLP output), 2 N M (MLP hidden before and after GELU), H N^2 (attention
    map) and 4 N (norm statistics). With checkpointing only the block inputs are kept, plus one
    block's activations while it is recomputed in backward. The input image (kept by the patch
    embedding) counts either way."""
    tokens, dim, heads = config.num_patches + 1, config.embed_dim, config.num_heads
    per_block = tokens * (10 * dim + 2 * config.hidden_mlp_dim + 4) + heads * tokens * tokens
    pixels = config.in_chans * config.image_size[0] * config.image_size[1]
    size = 4 if precision == "fp32" else 2
    if checkpointing:
        values = pixels + config.depth * tokens * dim + per_block
    else:
        values = pixels + config.depth * per_block
    return float(values * batch * size)


def state_bytes(precision: str, stage: int, offload_optimizer: bool) -> StateBytes:
    """Per-parameter bytes of each state as DeepSpeed keeps them for this precision and stage."""
    half = precision != "fp32"
    working = 2 if half else 4
    master = 4 if half or offload_optimizer or stage in (1, 2) else 0
    return StateBytes(working, working, master, 4 if half or offload_optimizer else 0)


def _zero_section(stage: int, offload_optimizer: bool, offload_params: bool, world: int) -> dict:
    """The zero_optimization section beitdist's engine writes for this setting (bucket sizes)."""
    from beitdist.engines.config import EngineConfig
    from beitdist.engines.deepspeed.config import deepspeed_config
    from beitdist.optim import OptimConfig

    engine = EngineConfig(zero_stage=stage, offload_optimizer=offload_optimizer, offload_params=offload_params)
    return deepspeed_config(engine, OptimConfig(), 1, world)["zero_optimization"]


def buffer_bytes(params: int, world: int, stage: int, offload_optimizer: bool, offload_params: bool,
                 working: int) -> float:
    """Gradient bucket plus, under ZeRO-3, the parameters kept gathered from forward to backward."""
    zero = _zero_section(stage, offload_optimizer, offload_params, world)
    if stage == 0:  # flattened from the gradients themselves, a bucket at a time
        bucket = min(params, ALLREDUCE_BUCKET_ELEMENTS) if world > 1 else 0
    else:  # allocated whole up front (stage3.py, stage_1_and_2.py: torch.empty(reduce_bucket_size))
        bucket = int(zero.get("reduce_bucket_size", 5e8))
    live = min(params, int(zero.get("stage3_max_live_parameters", MAX_LIVE_PARAMETERS))) if stage == 3 else 0
    return float((bucket + live) * working)


def plan(params: int, world: int, stage: int, precision: str, offload_optimizer: bool = False,
         offload_params: bool = False, activations: float = 0.0, largest_layer: int | None = None) -> MemoryPlan:
    """Per-rank memory for one setting. `largest_layer` defaults to `params.largest_layer` when
    `params` comes from `count_parameters`."""
    if offload_optimizer and stage == 0:
        raise ValueError("optimizer offload needs ZeRO stage 1, 2 or 3")
    if offload_params and stage != 3:
        raise ValueError("parameter offload needs ZeRO stage 3")
    if largest_layer is None:
        largest_layer = getattr(params, "largest_layer", 0)
    b = state_bytes(precision, stage, offload_optimizer)
    trainable = getattr(params, "trainable", params)  # frozen parameters: weights only
    weights = params * b.weights / (world if stage >= 3 else 1)
    grads = trainable * b.gradients / (world if stage >= 2 else 1)
    optim = trainable * b.optimizer / (world if stage >= 1 else 1)
    gathered = 2.0 * b.weights * largest_layer if stage == 3 else 0.0
    cpu = 0.0
    if offload_optimizer:
        cpu, optim = optim, 0.0
        if stage >= 2:
            grads = 0.0  # reduced straight into the host's fp32 gradient buffer (counted in optim)
    if offload_params:
        cpu, weights = cpu + weights, 0.0
    buffers = buffer_bytes(int(params), world, stage, offload_optimizer, offload_params, b.gradients)
    return MemoryPlan(stage, offload_optimizer, offload_params, params, weights, grads, optim, activations, cpu,
                      gathered, buffers)


def all_plans(params: int, world: int, precision: str, activations: float,
              largest_layer: int | None = None) -> list[MemoryPlan]:
    return [plan(params, world, s, precision, oo, op, activations, largest_layer) for s, oo, op in SETTINGS]


def smallest_fit(plans: list[MemoryPlan], device_bytes: float) -> MemoryPlan | None:
    """The first setting (least sharding and offload, so the fastest) that fits the device."""
    return next((p for p in plans if p.device_total <= device_bytes), None)


def forward_flops(backbone: BackboneConfig, head: str | None, head_options: Any = None) -> int:
    """FLOPs of one image's forward pass (a multiply-add counts 2), counted by torch's
    FlopCounterMode on the model built on the meta device (no memory, no arithmetic): exact for
    any head, plugins included. BEiT-B/16 at 224 px with a 1000-class head: 35.1 GFLOPs (the
    published 17.6 G multiply-adds)."""
    from torch.utils.flop_counter import FlopCounterMode

    from beitdist.model import build_model

    with torch.device("meta"):
        model = build_model(backbone, head, head_options).eval()
        pixels = torch.empty(1, backbone.in_chans, *backbone.image_size)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(pixels)
    return int(counter.get_total_flops())


PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}
"""Dense bf16/fp16 tensor-core peaks per GPU (vendor datasheets), for MFU; matched against the
device name."""


def peak_flops(device_name: str, precision: str) -> float | None:
    """The GPU's dense half-precision peak (None: unknown GPU, or an fp32 run)."""
    if precision not in ("bf16", "fp16"):
        return None
    return next((peak for name, peak in PEAK_FLOPS.items() if name in device_name.upper()), None)
