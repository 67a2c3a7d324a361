"""The `engine` section of a recipe: which training engine, and how it shards, offloads and
computes.

One dataclass for both engines (DeepSpeed, fairscale) because a recipe has one `engine` section;
it checks the combination here, at parse time, so a setting the chosen engine would ignore is
refused with one line instead of silently sharding or offloading less than the recipe says. What
each engine makes of it lives in its package (`beitdist.engines.deepspeed.config` writes
DeepSpeed's config). No engine is imported here: `beitdist.recipe` (and so `beitdist plan`, the
launcher's driver) parses recipes without DeepSpeed or fairscale.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from beitdist.schema import check

PRESETS: dict[str, dict[str, Any]] = {
    "ddp": {"zero_stage": 0},
    "zero1": {"zero_stage": 1},
    "zero2": {"zero_stage": 2},
    "zero2_offload": {"zero_stage": 2, "offload_optimizer": True},
    "zero3": {"zero_stage": 3},
    "zero3_offload": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
}


BACKENDS = ("deepspeed", "fairscale")
FAIRSCALE_MODES = ("oss", "fsdp")


@dataclass(frozen=True)
class EngineConfig:
    backend: Literal["deepspeed", "fairscale"] = "deepspeed"
    """Training engine: deepspeed (ZeRO 0-3, offload) or fairscale (`pip install beitdist[fairscale]`;
    for machines where DeepSpeed's JIT-built ops or pinned toolchains are not an option)."""
    fairscale_mode: Literal["oss", "fsdp"] = "oss"
    """fairscale only: oss (optimizer state sharded, gradients reduced to their owner: ZeRO-1/2
    style; CPU and GPU) or fsdp (FullyShardedDataParallel, parameters sharded too: GPU only)."""
    offload_activations: bool = False
    """fairscale only, with activation_checkpointing: keep the checkpointed activations on CPU
    (checkpoint_wrapper's offload_to_cpu)."""
    preset: str | None = None
    """Named setting: ddp, zero1, zero2, zero2_offload, zero3, zero3_offload (overrides the fields below)."""
    zero_stage: int = 0
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) on CPU (DeepSpeed CPU Adam; JIT-built on first use)."""
    offload_params: bool = False
    """ZeRO-3 only: keep parameters on CPU between uses."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = 1
    activation_checkpointing: bool = False
    zero_init: bool = True
    """Build the model under deepspeed.zero.Init when the stage is 3."""
    compile: bool = False
    """torch.compile the model (inductor) once the engine has wrapped it: layer norms, GELU,
    softmax, biases and residual adds fused into few kernels. The first training and the first
    evaluation step compile (tens of seconds on a GPU, minutes on a small CPU); weights,
    checkpoints and parameter names are unchanged."""
    tf32: bool = False
    """GPUs (A100 and later) only: fp32 matmuls in TensorFloat-32 (10-bit mantissa), several times
    faster for fp32 runs; false leaves the process's setting alone (torch's default: full fp32
    matmuls; cuDNN convolutions use TF32 either way). No effect on bf16/fp16 runs' low-precision
    matmuls or on CPUs."""
    raw: dict[str, Any] = field(default_factory=dict)
    """Escape hatch: merged last into the generated DeepSpeed config."""

    def __post_init__(self) -> None:
        if self.preset is not None:
            check(self.preset in PRESETS, "preset", f"got {self.preset!r}; allowed: {', '.join(PRESETS)}")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"expected 0, 1, 2 or 3, got {self.zero_stage}")
        check(self.grad_accum >= 1, "grad_accum", f"expected >= 1, got {self.grad_accum}")
        check(self.backend in BACKENDS, "backend", f"got {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        check(self.fairscale_mode in FAIRSCALE_MODES, "fairscale_mode",
              f"got {self.fairscale_mode!r}; allowed: {', '.join(FAIRSCALE_MODES)}")
        check(not self.offload_activations or self.activation_checkpointing, "offload_activations",
              "needs engine.activation_checkpointing: true (only checkpointed activations can be offloaded)")
        if self.backend == "fairscale":
            self._check_fairscale()
        else:
            check(self.fairscale_mode == "oss", "fairscale_mode",
                  f"is {self.fairscale_mode!r}, but engine.backend is deepspeed; set engine.backend: fairscale")
            check(not self.offload_activations, "offload_activations",
                  "is a fairscale setting (checkpoint_wrapper), but engine.backend is deepspeed; set engine.backend: fairscale")
        check(not self.offload_params or self.resolved()["zero_stage"] == 3, "offload_params",
              "parameter offload needs ZeRO stage 3")

    def _check_fairscale(self) -> None:
        """DeepSpeed-only settings are refused rather than ignored: a run must not silently shard
        (or offload) less than its recipe says."""
        modes = "engine.fairscale_mode: oss (sharded optimizer state and gradients, like ZeRO-2) or fsdp (parameters too, like ZeRO-3)"
        check(self.preset is None, "preset", f"is a DeepSpeed setting (got {self.preset!r}), but engine.backend is fairscale; use {modes}")
        check(self.zero_stage == 0, "zero_stage",
              f"is a DeepSpeed setting (got {self.zero_stage}), but engine.backend is fairscale; use {modes}")
        for name in ("offload_optimizer", "offload_params"):
            check(not getattr(self, name), name, "is a DeepSpeed setting, but engine.backend is fairscale; remove it")
        check(not self.raw, "raw", "is DeepSpeed's config, but engine.backend is fairscale; remove it")
        check(self.precision != "fp16", "precision",
              "fp16 is not supported with engine.backend fairscale; use bf16 (autocast, fp32 master weights) or fp32")

    def resolved(self) -> dict[str, Any]:
        """zero_stage / offload_optimizer / offload_params after applying the preset."""
        values = {"zero_stage": self.zero_stage, "offload_optimizer": self.offload_optimizer,
                  "offload_params": self.offload_params}
        if self.backend == "fairscale":  # the ZeRO stage with the same memory (for `beitdist plan`)
            return {**values, "zero_stage": 2 if self.fairscale_mode == "oss" else 3}
        if self.preset is not None:
            values.update({"offload_optimizer": False, "offload_params": False}, **PRESETS[self.preset])
        return values

    @property
    def stage(self) -> int:
        return self.resolved()["zero_stage"]
