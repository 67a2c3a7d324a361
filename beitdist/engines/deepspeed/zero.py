"""ZeRO-3 model construction: parameters born partitioned, and full weights copied in piece by piece.

Under ZeRO-3 no rank ever materialises the whole model: the model is built inside
`deepspeed.zero.Init` (each parameter is partitioned as it is created) and initial weights
(`model.init`) are copied one gathered parameter at a time. Other stages and engines build
and load models normally (`TrainEngine.model_construction` / `load_weights`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from beitdist.engines.config import EngineConfig
from beitdist.engines.deepspeed.importing import import_deepspeed


@contextlib.contextmanager
def model_construction(engine: EngineConfig, ds_config: dict[str, Any]) -> Iterator[None]:
    """Build the model inside this: under ZeRO-3 parameters are partitioned as they are created."""
    if engine.backend == "deepspeed" and engine.stage == 3 and engine.zero_init:
        deepspeed = import_deepspeed()

        # offloaded parameters' host partitions are pinned by ds_config (offload_param.pin_memory)
        with deepspeed.zero.Init(config_dict_or_path=ds_config,
                                 remote_device="cpu" if engine.resolved()["offload_params"] else None):
            yield
    else:
        yield


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a full state dict into a model whose parameters may be ZeRO-3 partitioned, one
    parameter at a time (never the whole model gathered on one rank)."""
    deepspeed = import_deepspeed()

    for name, tensor in model.named_parameters():
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
            if dist.get_rank() == 0:
                tensor.data.copy_(state[name].to(tensor.dtype))
    # only rank 0 holds `state`. DeepSpeed broadcasts rank 0's module at initialize, except one
    # built under zero.Init (its buffers already on the device): then rank 0's buffers (e.g.
    # SyncBatchNorm's running statistics) are sent here
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    for name, buffer in model.named_buffers():
        if name in state:
            buffer.data.copy_(state[name].to(buffer.dtype))
        if partitioned:
            dist.broadcast(buffer.data, src=0)
