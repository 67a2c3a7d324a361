"""Training engines behind one interface (`TrainEngine`), chosen by `engine.backend`.

- deepspeed (default, `beitdist.engines.deepspeed`): ZeRO 0-3, offload, universal checkpoints
  for world-size changes.
- fairscale (`pip install beitdist[fairscale]`, `beitdist.engines.fairscale`):
  `engine.fairscale_mode` oss (OSS + ShardedDataParallel, CPU and GPU) or fsdp
  (FullyShardedDataParallel, GPU only).

Every line that imports or knows an engine library lives in that engine's package; this module
only picks the package by name and imports it when it is needed, so importing beitdist (or
parsing a recipe) imports neither DeepSpeed nor fairscale. Both engines take their optimizer from
the one builder in `beitdist.optim` (layer-wise lr decay groups, schedules applied by the Trainer,
clipping by global norm), and both checkpoint into the same run directory layout (manifest +
atomic `latest`, `beitdist.run.checkpoints`); each engine package consolidates its own
checkpoints to the same full state dict (`consolidate(tag_dir)`).
"""

from __future__ import annotations

import torch

from beitdist.distributed import DistInfo, init_process_group, uses_cuda
from beitdist.engines.base import TrainEngine
from beitdist.engines.config import EngineConfig
from beitdist.errors import InputError
from beitdist.optim import OptimConfig


class EngineUnavailableError(InputError):
    """The recipe selects an engine (or mode) this machine cannot run; one line that says what to
    install or choose instead."""


def check_engine_available(config: EngineConfig, cuda: bool | None = None) -> None:
    """Raise EngineUnavailableError unless this process can run `config`'s engine (fairscale
    installed; CUDA for fsdp)."""
    if config.backend != "fairscale":
        return
    from beitdist.engines.fairscale import require_fairscale

    require_fairscale()
    if cuda is None:
        cuda = uses_cuda()
    if config.fairscale_mode == "fsdp" and not cuda:
        raise EngineUnavailableError(
            "engine.fairscale_mode: fsdp needs CUDA GPUs (fairscale's FullyShardedDataParallel is GPU-only), "
            "but this process has none; use engine.fairscale_mode: oss (sharded optimizer state, runs on CPU) "
            "or engine.backend: deepspeed (ZeRO-3 runs on CPU)"
        )


def init_distributed(dist_info: DistInfo, backend: str = "deepspeed") -> None:
    """Join (or create) the process group for the engine `backend` names: DeepSpeed through its
    own communication layer (which wraps the same torch process group), every other engine
    through torch's (`beitdist.distributed.init_process_group`)."""
    if backend == "deepspeed":
        from beitdist.engines.deepspeed.comm import init_distributed as init_deepspeed

        init_deepspeed(dist_info)
    else:
        init_process_group(dist_info)


def create_engine(config: EngineConfig, optim: OptimConfig, micro_batch: int, world_size: int,
                  device: torch.device) -> TrainEngine:
    """The engine `config.backend` names, or EngineUnavailableError."""
    check_engine_available(config, cuda=device.type == "cuda")
    if config.backend == "fairscale":
        from beitdist.engines.fairscale.engine import FairscaleEngine

        return FairscaleEngine(config, optim, micro_batch, world_size, device)
    from beitdist.engines.deepspeed.engine import DeepSpeedEngine

    return DeepSpeedEngine(config, optim, micro_batch, world_size, device)


__all__ = ["EngineConfig", "EngineUnavailableError", "TrainEngine", "check_engine_available", "create_engine",
           "init_distributed"]
