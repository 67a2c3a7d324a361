"""DeepSpeed's config, written from the recipe's `engine` and `optim` sections.

beitdist writes every DeepSpeed setting that changes results explicitly (gradient clipping above
all: DeepSpeed >= 0.17 silently defaults it to 1.0); the optimizer and the lr / wd schedule are
beitdist's own (a client AdamW built from the layer-decay groups, which also avoids JIT-building
fused Adam), so the config has no optimizer or scheduler section. `engine.raw` is merged last.

Plain data in, plain dict out, and no DeepSpeed import: `beitdist plan` reads the bucket sizes
from here without DeepSpeed installed.
"""

from __future__ import annotations

from typing import Any

from beitdist.distributed import uses_cuda
from beitdist.engines.config import EngineConfig
from beitdist.optim import OptimConfig


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(engine: EngineConfig, optim: OptimConfig, micro_batch: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for this recipe (optimizer and scheduler are beitdist's own)."""
    resolved = engine.resolved()
    zero: dict[str, Any] = {"stage": resolved["zero_stage"]}
    if resolved["zero_stage"] > 0:
        # overlap_comm: ZeRO-3 reduce-scatters each gradient bucket on a side stream while the
        # backward goes on (DeepSpeed's own default for stage 3, and the same memory: one bucket
        # either way). ZeRO-1/2 keep it off, as DeepSpeed does: there it doubles the bucket.
        zero.update({"contiguous_gradients": True, "overlap_comm": resolved["zero_stage"] == 3,
                     "reduce_bucket_size": 5e7})
    if resolved["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": uses_cuda()}
    if resolved["offload_params"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": uses_cuda()}
    if resolved["zero_stage"] == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False, "stage3_param_persistence_threshold": 1e4})
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": engine.grad_accum,
        "train_batch_size": micro_batch * engine.grad_accum * world_size,
        "gradient_clipping": float(optim.clip_grad),
        "zero_optimization": zero,
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": resolved["offload_optimizer"],
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, engine.raw)
