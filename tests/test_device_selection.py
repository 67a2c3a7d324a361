"""Which device and collective backend a rank uses, and what a launch asks Ray for: the choices
that decide whether a GPU run works at all. This machine has no GPU, so CUDA's presence is
simulated; the GPU paths themselves are exercised by benchmarks/device_check.sh on a GPU."""

from __future__ import annotations

import pytest
import torch

from beitdist import distributed
from beitdist.data.pipeline import DataConfig, _pin_memory
from beitdist.schema import OptionsError
from beitdist.launcher import uses_gpu
from beitdist.recipe import ScalingSection, load_recipe

QUICKSTART = "recipes/quickstart.yaml"


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)


def test_a_rank_follows_deepspeeds_accelerator(two_gpus, monkeypatch):
    """DS_ACCELERATOR=cpu on a GPU machine puts the whole rank on the CPU (gloo): DeepSpeed places
    the model there, so batches and collectives must not go to the GPU."""
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)
    assert distributed.uses_cuda()
    assert distributed.device_for(distributed.DistInfo(local_rank=3)) == torch.device("cuda", 1)
    assert _pin_memory(DataConfig(dataset="digits"))
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert not distributed.uses_cuda()
    assert distributed.device_for(distributed.DistInfo(local_rank=1)) == torch.device("cpu")
    assert not _pin_memory(DataConfig(dataset="digits"))
    assert _pin_memory(DataConfig(dataset="digits", pin_memory=True))


def test_use_gpu_auto_asks_the_cluster(monkeypatch):
    """A CPU-only head node launching on a GPU cluster trains on the cluster's GPUs."""
    recipe = load_recipe(QUICKSTART)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert recipe.scaling.use_gpu == "auto"
    assert uses_gpu(recipe) is False
    assert uses_gpu(recipe, cluster_gpus=8.0) is True
    assert uses_gpu(recipe, cluster_gpus=0.0) is False
    off = recipe.replace(scaling=ScalingSection(num_workers=2, use_gpu=False))
    assert uses_gpu(off, cluster_gpus=8.0) is False
    cpu_workers = recipe.replace(scaling=ScalingSection(num_workers=2, resources_per_worker={"CPU": 4, "GPU": 0}))
    assert uses_gpu(cpu_workers, cluster_gpus=8.0) is False


@pytest.mark.parametrize("gpus", [0.5, 2.0])
def test_a_worker_drives_exactly_one_gpu(gpus):
    with pytest.raises(OptionsError, match=r"resources_per_worker\.GPU.*exactly one GPU"):
        ScalingSection(num_workers=2, resources_per_worker={"CPU": 4, "GPU": gpus})
    assert ScalingSection(num_workers=2, resources_per_worker={"CPU": 4, "GPU": 1}).resources_per_worker["GPU"] == 1
    with pytest.raises(OptionsError, match=r"resources_per_worker\.GPU.*use_gpu is true"):
        ScalingSection(num_workers=2, use_gpu=True, resources_per_worker={"GPU": 0})


def test_tf32_is_a_recipe_switch_for_cuda_matmuls_only(monkeypatch):
    """`engine.tf32: true` turns on TF32 for CUDA fp32 matmuls (torch >= 2.9's per-backend switch
    where it exists) and leaves oneDNN's CPU matmuls in full fp32; the default changes nothing."""
    recipe = load_recipe(QUICKSTART, overrides=["engine.tf32=true"])
    assert recipe.engine.tf32 and not load_recipe(QUICKSTART).engine.tf32
    matmul = torch.backends.cuda.matmul
    new_api = hasattr(matmul, "fp32_precision")

    def cuda_tf32() -> bool:
        return matmul.fp32_precision == "tf32" if new_api else matmul.allow_tf32

    if new_api:
        monkeypatch.setattr(matmul, "fp32_precision", "ieee")
        cpu_precision = torch.backends.mkldnn.matmul.fp32_precision
    else:
        monkeypatch.setattr(matmul, "allow_tf32", False)
    distributed.apply_matmul_precision(load_recipe(QUICKSTART).engine)
    assert not cuda_tf32()
    distributed.apply_matmul_precision(recipe.engine)
    assert cuda_tf32()
    if new_api:
        assert torch.backends.mkldnn.matmul.fp32_precision == cpu_precision


@pytest.mark.parametrize("env, expected", [({}, "4"), ({"LOCAL_WORLD_SIZE": "2"}, "2"),
                                           ({"LOCAL_SIZE": "1", "LOCAL_WORLD_SIZE": "2"}, "1")])
def test_local_size_is_the_ranks_of_this_node(monkeypatch, env, expected):
    """DeepSpeed's CPU shared-memory all-reduce runs only when LOCAL_SIZE equals the world size:
    a two-node torchrun (LOCAL_WORLD_SIZE 2 of 4) must not wait for the other node's buffers."""
    import os

    from beitdist.distributed import DistInfo, rendezvous_env
    from beitdist.network import DEFAULT_ROUTE_PROBE, route_source

    if expected != "4" and route_source(DEFAULT_ROUTE_PROBE) is None:
        pytest.skip("no default route on this machine: a multi-node layout has no interface to bind")

    names = ("LOCAL_SIZE", "LOCAL_WORLD_SIZE", "RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    environ = {k: v for k, v in os.environ.items() if k not in names}
    monkeypatch.setattr(os, "environ", {**environ, **env})  # rendezvous_env writes the process environment
    rendezvous_env(DistInfo(rank=1, world_size=4, local_rank=1, master_port=29999))
    assert os.environ["LOCAL_SIZE"] == expected and os.environ["WORLD_SIZE"] == "4"
    if expected != "4":  # spans nodes: MASTER_ADDR 127.0.0.1 (this host's name, say) is not what peers reach
        assert os.environ.get("GLOO_SOCKET_IFNAME") not in (None, "lo")  # the default route's interface
