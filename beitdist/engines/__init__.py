"""Training engines behind one interface (`TrainEngine`), chosen by `engine.backend`.

- deepspeed (default): ZeRO 0-3, offload, universal checkpoints for world-size changes.
- fairscale (`pip install beitdist[fairscale]`): `engine.fairscale_mode` oss (OSS +
  ShardedDataParallel, CPU and GPU) or fsdp (FullyShardedDataParallel, GPU only).

Both take their optimizer from the one builder in `beitdist.optim` (layer-wise lr decay groups,
schedules applied by the Trainer, clipping by global norm), and both checkpoint into the same run
directory layout (manifest + atomic `latest`, `beitdist.run_checkpoints`), which consolidates to
the same beitdist checkpoint.
"""

from __future__ import annotations

import importlib

import torch

from beitdist.engine import EngineConfig
from beitdist.engines.base import TrainEngine
from beitdist.errors import InputError
from beitdist.optim import OptimConfig

FAIRSCALE_REQUIREMENT = "fairscale==0.4.13"


class EngineUnavailableError(InputError):
    """The recipe selects an engine (or mode) this machine cannot run; one line that says what to
    install or choose instead."""


def _import_fairscale() -> None:
    try:
        importlib.import_module("fairscale")
    except ImportError as err:
        raise EngineUnavailableError(
            f"engine.backend: fairscale is selected but fairscale is not installed ({err}); install it with "
            f"`pip install 'beitdist[fairscale]'` ({FAIRSCALE_REQUIREMENT}), or set engine.backend: deepspeed"
        ) from None


def check_engine_available(config: EngineConfig, cuda: bool | None = None) -> None:
    """Raise EngineUnavailableError unless this process can run `config`'s engine (fairscale
    installed; CUDA for fsdp)."""
    if config.backend != "fairscale":
        return
    _import_fairscale()
    if cuda is None:
        from beitdist.engine import uses_cuda

        cuda = uses_cuda()
    if config.fairscale_mode == "fsdp" and not cuda:
        raise EngineUnavailableError(
            "engine.fairscale_mode: fsdp needs CUDA GPUs (fairscale's FullyShardedDataParallel is GPU-only), "
            "but this process has none; use engine.fairscale_mode: oss (sharded optimizer state, runs on CPU) "
            "or engine.backend: deepspeed (ZeRO-3 runs on CPU)"
        )


def create_engine(config: EngineConfig, optim: OptimConfig, micro_batch: int, world_size: int,
                  device: torch.device) -> TrainEngine:
    """The engine `config.backend` names, or EngineUnavailableError."""
    check_engine_available(config, cuda=device.type == "cuda")
    if config.backend == "fairscale":
        from beitdist.engines.fairscale_engine import FairscaleEngine

        return FairscaleEngine(config, optim, micro_batch, world_size, device)
    from beitdist.engines.deepspeed_engine import DeepSpeedEngine

    return DeepSpeedEngine(config, optim, micro_batch, world_size, device)


__all__ = ["EngineUnavailableError", "TrainEngine", "check_engine_available", "create_engine"]
