"""`model.init` into a model built under ZeRO-3's zero.Init: rank 0 alone reads the weights, and
every rank must end with the same parameters and buffers (DeepSpeed broadcasts nothing for such a
model; a BatchNorm's running statistics stayed at their initial values on the other ranks)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

pytestmark = pytest.mark.slow

WORLD = 2


def _model() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))


def _rank(rank: int, port: int, out: str) -> None:
    os.environ.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    from beitdist.distributed import DistInfo
    from beitdist.engines import init_distributed
    from beitdist.engines.config import EngineConfig
    from beitdist.engines.deepspeed.config import deepspeed_config
    from beitdist.engines.deepspeed.importing import import_deepspeed
    from beitdist.engines.deepspeed.zero import load_weights_into, model_construction
    from beitdist.optim import OptimConfig

    init_distributed(DistInfo(rank=rank, world_size=WORLD, local_rank=rank, master_port=port))
    config = EngineConfig(zero_stage=3)
    with model_construction(config, deepspeed_config(config, OptimConfig(), 1, WORLD)):
        model = _model()
    assert all(hasattr(p, "ds_id") for p in model.parameters())  # partitioned: the case under test
    state = {}
    if rank == 0:
        torch.manual_seed(1)
        state = {k: (torch.randn_like(v.float()) + 3).to(v.dtype) for k, v in _model().state_dict().items()}
        state["1.num_batches_tracked"] = torch.tensor(7)
    load_weights_into(model, state)
    deepspeed = import_deepspeed()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        full = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"state": full, "expected": state}, os.path.join(out, f"rank{rank}.pt"))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def test_every_rank_gets_rank0s_parameters_and_buffers(tmp_path):
    from beitdist.distributed import free_port

    mp.spawn(_rank, args=(free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    saved = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    expected = saved[0]["expected"]
    assert {"1.running_mean", "1.running_var", "1.num_batches_tracked"} <= set(expected)
    for rank in range(WORLD):
        state = saved[rank]["state"]
        assert sorted(state) == sorted(expected), rank
        for key, value in expected.items():
            torch.testing.assert_close(state[key], value, msg=f"rank {rank}: {key}")
