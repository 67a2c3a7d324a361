"""`beitdist plan`: per-rank memory against DeepSpeed's own estimators, parameter counts, activation
counts against autograd, the smallest-fit choice and the CLI.

DeepSpeed's estimators (`estimate_zero2_model_states_mem_needs`, `estimate_zero3_model_states_mem_needs`
and the `..._all_cold` tables that print them) assume fp16/bf16 mixed precision with an fp32 master
copy, and count per parameter: 2 B 16-bit weights, 2 B 16-bit gradients, 4 B fp32 gradients, 4 B fp32
master, 8 B Adam moments; ZeRO-3 adds the largest layer gathered (4 B: its 16-bit weights and
gradients). Their "per CPU" number is per node, times a 1.5 buffer factor. beitdist counts the same
states per rank, so in bf16 the two agree exactly except where noted below:

- ZeRO-3 without offload: DeepSpeed's per-GPU number (`4 L + 18 P / N`) leaves out the 16-bit weight
  partition, 2 P / N, that its own optimizer-offload branch (`4 L + 2 P / N`) does count and that
  stage3.py keeps (`fp16_partitioned_groups_flat`); beitdist counts it.
- ZeRO-2 offload host memory: DeepSpeed takes `max(4 * gpus_per_node, 16)` bytes a parameter for the
  moment every rank still holds a full fp32 model on the host (no zero.Init); beitdist plans the
  steady state, 16 B / world, which is the same number up to 4 GPUs a node.
- fp32 (beitdist's CPU default) has no DeepSpeed estimator; beitdist counts 4 B weights and
  gradients, 8 B moments, a 4 B master only where DeepSpeed makes one (ZeRO-1/2 clone their partition,
  ZeRO-3 reuses its fp32 partition, DDP steps the model itself) and no separate fp32 gradient.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import beitdist
from beitdist.plan import (GIB, OVERHEAD, SETTINGS, MemoryPlan, ParameterCount, activation_bytes, all_plans,
                           count_parameters, plan, smallest_fit)

LARGE_IN22K = str(Path(__file__).resolve().parent.parent / "recipes" / "beit_large_in22k.yaml")


@pytest.fixture(scope="module")
def ds_estimators():
    stage12 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    stage3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    return stage12, stage3


@pytest.fixture(scope="module")
def large() -> ParameterCount:
    """BEiT-L/16 at 224 px with a 1000-class head, counted on the meta device."""
    return count_parameters(beitdist.variant("large"), "classification", {"num_classes": 1000})


def analytic_count(config: beitdist.BackboneConfig, classes: int) -> int:
    """Parameters of a BEiT with per-block relative-position tables, layer scale, mean pooling and
    a linear classifier, written out by hand (an independent check of the built model)."""
    d, m, heads = config.embed_dim, config.hidden_mlp_dim, config.num_heads
    gh, gw = config.grid_size
    table = ((2 * gh - 1) * (2 * gw - 1) + 3) * heads
    attention = 3 * d * d + 2 * d + d * d + d + table  # qkv (no bias), q/v biases, proj, rel-pos table
    mlp = d * m + m + m * d + d
    block = 2 * 2 * d + attention + mlp + 2 * d  # two norms, gamma_1/gamma_2
    stem = 3 * config.patch_size**2 * d + d + d  # patch embedding and the CLS token
    return stem + config.depth * block + 2 * d + d * classes + classes  # fc_norm, classifier


# ------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize("variant, expected_millions", [("base", 86.5), ("large", 304.4)])
def test_parameter_counts_of_published_sizes(variant: str, expected_millions: float) -> None:
    config = beitdist.variant(variant)
    count = count_parameters(config, "classification", {"num_classes": 1000})
    assert count == analytic_count(config, 1000)
    assert round(count / 1e6, 1) == expected_millions


def test_counting_on_the_meta_device_stays_cheap(monkeypatch: pytest.MonkeyPatch) -> None:
    """`beitdist plan` / `launch` count parameters on the meta device: the relative-position index
    is built on the CPU and moved there (same values), so counting never imports torch._dynamo
    (seconds of every CLI start); nor does the CLI import scipy, which only a change of resolution
    needs. In a fresh interpreter: this one may have imported them already."""
    import subprocess
    import sys

    code = ("import sys, torch, beitdist, beitdist.cli, beitdist.train\n"
            "assert 'scipy' not in sys.modules, 'the CLI imported scipy (only resampling needs it)'\n"
            "from beitdist.plan import count_parameters\n"
            "from beitdist.backbone.layers import relative_position_index\n"
            "count_parameters(beitdist.variant('base'), 'classification', {'num_classes': 10})\n"
            "with torch.device('meta'):\n"
            "    meta = relative_position_index((3, 4))\n"
            "assert meta.device.type == 'meta' and meta.shape == (13, 13), meta\n"
            "assert 'torch._dynamo' not in sys.modules, 'counting imported torch._dynamo'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    from beitdist.backbone.layers import relative_position_index

    index = relative_position_index((3, 4))
    assert index.device.type == "cpu" and int(index[0, 0]) == 5 * 7 + 2 and int(index[1, 1]) == 2 * 7 + 3
    # DeepSpeed's zero.Init gives factory calls without a device its own device (not the default
    # device): the index follows it there, as every other tensor the model builds
    empty = torch.empty
    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: empty(*args, **{"device": "meta", **kwargs}))
    assert relative_position_index((3, 4)).device.type == "meta"


def test_count_and_largest_layer_match_deepspeed_on_a_real_model(ds_estimators) -> None:
    """DeepSpeed's `model_to_params` dedups by data pointer, so it needs real storage: a small model."""
    _, stage3 = ds_estimators
    config = beitdist.variant("tiny", image_size=64)
    model = beitdist.build_model(config, "classification", {"num_classes": 10})
    total, largest = stage3.model_to_params(model)
    count = count_parameters(config, "classification", {"num_classes": 10})
    assert (int(count), count.largest_layer) == (total, largest)
    assert count == sum(p.numel() for p in model.parameters())


def test_largest_layer_of_beit_large(large: ParameterCount) -> None:
    assert large.largest_layer == 1024 * 4096 + 4096  # mlp.fc1 (weight and bias) outgrows qkv (3 x 1024^2)


# ------------------------------------------------------------------ against DeepSpeed's estimators
WORLDS = [(1, 1), (1, 8), (2, 8), (1, 16), (8, 8)]  # (nodes, GPUs per node)


@pytest.mark.parametrize("nodes, per_node", WORLDS)
def test_zero2_matches_deepspeed(ds_estimators, large: ParameterCount, nodes: int, per_node: int) -> None:
    stage12, _ = ds_estimators
    world = nodes * per_node
    cpu, gpu = stage12.estimate_zero2_model_states_mem_needs(large, per_node, nodes, cpu_offload=False)
    assert plan(large, world, 2, "bf16").model_states == pytest.approx(gpu, abs=1)
    cpu, gpu = stage12.estimate_zero2_model_states_mem_needs(large, per_node, nodes, cpu_offload=True)
    offload = plan(large, world, 2, "bf16", offload_optimizer=True)
    assert offload.model_states == pytest.approx(gpu, abs=1)
    if per_node <= 4 and nodes == 1:  # beyond, DeepSpeed's init-time 4 B x GPUs a node dominates
        assert offload.cpu * per_node * 1.5 == pytest.approx(cpu, rel=1e-9)
    assert offload.cpu == pytest.approx(16 * large / world)


@pytest.mark.parametrize("nodes, per_node", WORLDS)
def test_zero3_matches_deepspeed(ds_estimators, large: ParameterCount, nodes: int, per_node: int) -> None:
    _, stage3 = ds_estimators
    world, layer = nodes * per_node, large.largest_layer

    def deepspeed(opt: bool, params: bool) -> tuple[int, int]:
        cpu, gpu, gathered = stage3.estimate_zero3_model_states_mem_needs(
            large, layer, per_node, nodes, cpu_offload=opt, cpu_offload_params=params, zero_init=True)
        assert plan(large, world, 3, "bf16").gathered == gathered
        return cpu, gpu

    _, gpu = deepspeed(False, False)
    # the one documented difference: beitdist also counts the 16-bit weight partition
    assert plan(large, world, 3, "bf16").model_states - 2 * large / world == pytest.approx(gpu, abs=1)
    cpu, gpu = deepspeed(True, False)
    offload = plan(large, world, 3, "bf16", offload_optimizer=True)
    assert offload.model_states == pytest.approx(gpu, abs=1)
    assert offload.cpu * per_node * 1.5 == pytest.approx(cpu, rel=1e-9)  # DeepSpeed: per node, x1.5
    cpu, gpu = deepspeed(True, True)
    both = plan(large, world, 3, "bf16", offload_optimizer=True, offload_params=True)
    assert both.model_states == pytest.approx(gpu, abs=1)
    assert both.cpu * per_node * 1.5 == pytest.approx(cpu, rel=1e-9)


@pytest.mark.parametrize("world", [1, 2, 16])
def test_zero0_and_zero1_against_the_zero2_estimate(ds_estimators, large: ParameterCount, world: int) -> None:
    """DeepSpeed has no ZeRO-0/1 estimator. On one rank nothing is partitioned, so every stage is
    its ZeRO-2 estimate at one GPU (20 B a parameter); ZeRO-1 is ZeRO-2 with the 16-bit gradients
    left whole."""
    stage12, _ = ds_estimators
    _, one_gpu = stage12.estimate_zero2_model_states_mem_needs(large, 1, 1, cpu_offload=False)
    _, gpu = stage12.estimate_zero2_model_states_mem_needs(large, world, 1, cpu_offload=False)
    assert plan(large, world, 0, "bf16").model_states == pytest.approx(one_gpu, abs=1) == 20 * large
    zero1 = plan(large, world, 1, "bf16").model_states
    assert zero1 == pytest.approx(gpu + 2 * large * (1 - 1 / world), abs=1)
    for stage in range(4):
        assert plan(large, 1, stage, "bf16").model_states - plan(large, 1, stage, "bf16").gathered == 20 * large


def test_cold_tables_print_the_same_numbers(ds_estimators, large: ParameterCount, capsys) -> None:
    """The `_all_cold` helpers the DeepSpeed docs point to print per-GPU GB (2**30 bytes) per option."""
    stage12, stage3 = ds_estimators
    stage12.estimate_zero2_model_states_mem_needs_all_cold(large, num_gpus_per_node=16)
    stage3.estimate_zero3_model_states_mem_needs_all_cold(large, large.largest_layer, num_gpus_per_node=16)
    rows = {}
    for line in capsys.readouterr().out.splitlines():
        match = re.match(r"\s*([\d.]+)GB \|\s*([\d.]+)GB \| (.*)", line)
        if match:
            # the offload device prints as "cpu " or "OffloadDeviceEnum.cpu" depending on Python's Enum format
            options = match.group(3).replace("OffloadDeviceEnum.", "").replace(" ", "")
            rows[options] = float(match.group(2))
    def gib(**kw: object) -> object:
        return pytest.approx(plan(large, 16, **kw).model_states / GIB, abs=0.006)

    assert rows["offload_optimizer=none"] == gib(stage=2, precision="bf16")
    assert rows["offload_optimizer=cpu"] == gib(stage=2, precision="bf16", offload_optimizer=True)
    assert rows["offload_param=cpu,offload_optimizer=cpu,zero_init=1"] == gib(
        stage=3, precision="bf16", offload_optimizer=True, offload_params=True)
    assert rows["offload_param=none,offload_optimizer=cpu,zero_init=1"] == gib(
        stage=3, precision="bf16", offload_optimizer=True)
    zero3 = plan(large, 16, 3, "bf16")
    assert rows["offload_param=none,offload_optimizer=none,zero_init=1"] == pytest.approx(
        (zero3.model_states - 2 * large / 16) / GIB, abs=0.006)


def test_fp32_counts_what_deepspeed_keeps(large: ParameterCount) -> None:
    """fp32 AdamW is 16 B a parameter (4 weights, 4 gradients, 8 moments): whole under DDP, / world
    under ZeRO-3 (whose fp32 partition is its own master), plus the gathered layer in fp32; ZeRO-1/2
    add the 4 B master partition DeepSpeed clones."""
    p, layer, world = large, large.largest_layer, 2
    assert plan(p, world, 0, "fp32").model_states == 16 * p
    assert plan(p, world, 1, "fp32").model_states == pytest.approx(4 * p + 4 * p + 12 * p / world)
    assert plan(p, world, 2, "fp32").model_states == pytest.approx(4 * p + 16 * p / world)
    assert plan(p, world, 3, "fp32").model_states == pytest.approx(16 * p / world + 8 * layer)
    offload = plan(p, world, 3, "fp32", offload_optimizer=True)
    assert offload.cpu == pytest.approx(16 * p / world)  # host master, fp32 gradients and moments
    assert offload.model_states == pytest.approx(4 * p / world + 8 * layer)


def test_offload_needs_zero() -> None:
    with pytest.raises(ValueError, match="stage"):
        plan(1000, 2, 0, "bf16", offload_optimizer=True)
    with pytest.raises(ValueError, match="stage 3"):
        plan(1000, 2, 2, "bf16", offload_optimizer=True, offload_params=True)


def test_buffers_follow_beitdist_deepspeed_config(large: ParameterCount) -> None:
    """ZeRO allocates the whole `reduce_bucket_size` beitdist writes; ZeRO-3 keeps up to
    `stage3_max_live_parameters` (DeepSpeed's default 1e9) gathered, here the whole model; DDP
    flattens up to DeepSpeed's `allreduce_bucket_size` (5e8) gradients at once, and only across ranks."""
    from beitdist.engines.config import EngineConfig
    from beitdist.engines.deepspeed.config import deepspeed_config
    from beitdist.optim import OptimConfig

    zero = deepspeed_config(EngineConfig(zero_stage=3), OptimConfig(), 1, 2)["zero_optimization"]
    bucket = int(zero["reduce_bucket_size"])
    live = min(int(zero.get("stage3_max_live_parameters", 1e9)), large)
    assert plan(large, 2, 2, "fp32").buffers == 4 * bucket
    assert plan(large, 2, 3, "bf16").buffers == 2 * (bucket + live)
    assert plan(large, 2, 0, "bf16").buffers == 2 * large
    assert plan(large, 1, 0, "bf16").buffers == 0


def test_only_zero3_overlaps_its_gradient_reduction_with_the_backward() -> None:
    """ZeRO-3 keeps one reduce bucket whether it overlaps or not (the planner's count holds);
    ZeRO-1/2 would allocate a second one, so they stay with DeepSpeed's default (off)."""
    from beitdist.engines.config import EngineConfig
    from beitdist.engines.deepspeed.config import deepspeed_config
    from beitdist.optim import OptimConfig

    overlap = {stage: deepspeed_config(EngineConfig(zero_stage=stage), OptimConfig(), 1, 2)["zero_optimization"]
               .get("overlap_comm") for stage in (0, 1, 2, 3)}
    assert overlap == {0: None, 1: False, 2: False, 3: True}
    raw = EngineConfig(zero_stage=3, raw={"zero_optimization": {"overlap_comm": False}})
    assert deepspeed_config(raw, OptimConfig(), 1, 2)["zero_optimization"]["overlap_comm"] is False


# ------------------------------------------------------------------ activations
def saved_activation_bytes(model: torch.nn.Module, pixels: torch.Tensor) -> int:
    """Bytes autograd saves for backward in one forward (unique storages, parameters excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    buffers = {b.untyped_storage().data_ptr() for b in model.buffers()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params | buffers:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(pixels)
    return sum(storages.values())


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_count_matches_autograd(checkpointing: bool) -> None:
    """Weights, attention maps and MLP widths all matter at this size (N = 65, D = 64, H = 4)."""
    config = beitdist.BackboneConfig(embed_dim=64, depth=3, num_heads=4, image_size=64, patch_size=8,
                                     grad_checkpointing=checkpointing)
    torch.manual_seed(0)
    model = beitdist.build_model(config, "classification", {"num_classes": 10}).train()
    batch = 2
    measured = saved_activation_bytes(model, torch.randn(batch, 3, 64, 64))
    planned = activation_bytes(config, batch, "fp32", checkpointing)
    if checkpointing:  # forward keeps the block inputs; one block is recomputed during backward
        pixels = 3 * 64 * 64 * batch * 4
        planned -= (activation_bytes(config, batch, "fp32", False) - pixels) / config.depth
    assert measured == pytest.approx(planned, rel=0.1)


def test_activations_scale_with_batch_and_precision() -> None:
    config = beitdist.variant("large")
    fp32 = activation_bytes(config, 2, "fp32", False)
    assert activation_bytes(config, 4, "fp32", False) == 2 * fp32
    assert activation_bytes(config, 2, "bf16", False) == fp32 / 2
    assert activation_bytes(config, 2, "fp32", True) < fp32 / 10


# ------------------------------------------------------------------ choosing a setting
def in22k_plans(world: int = 16) -> list[MemoryPlan]:
    from beitdist.recipe import load_recipe

    recipe = load_recipe(LARGE_IN22K, [])
    backbone = recipe.model.backbone_config()
    params = count_parameters(backbone, recipe.head.name, recipe.head.options)
    activations = activation_bytes(backbone, recipe.data.batch_size, recipe.engine.precision,
                                   recipe.engine.activation_checkpointing)
    return all_plans(params, world, recipe.engine.precision, activations)


def test_smallest_fit_is_the_fastest_setting_that_fits() -> None:
    plans = in22k_plans()
    assert [(p.stage, p.offload_optimizer, p.offload_params) for p in plans] == list(SETTINGS)
    for budget_gib in (16, 24, 32, 64):
        fit = smallest_fit(plans, budget_gib * GIB)
        assert fit is not None and fit.device_total <= budget_gib * GIB
        assert all(p.device_total > budget_gib * GIB for p in plans[:plans.index(fit)])
    # 20 B a parameter of model states alone cost DDP ~6 GiB on top of ~12 GiB of activations
    assert smallest_fit(plans, 16 * GIB).stage >= 1
    assert smallest_fit(plans, 64 * GIB).stage == 0


def test_too_small_a_gpu_fits_nothing() -> None:
    plans = in22k_plans()
    assert min(p.device_total for p in plans) > min(p.activations for p in plans) * OVERHEAD
    assert smallest_fit(plans, 4 * GIB) is None


def test_more_sharding_never_needs_more_device_memory_for_states() -> None:
    plans = {(p.stage, p.offload_optimizer, p.offload_params): p for p in in22k_plans()}
    order = [(0, False, False), (1, False, False), (2, False, False), (2, True, False)]
    states = [plans[key].weights + plans[key].gradients + plans[key].optimizer for key in order]
    assert states == sorted(states, reverse=True)
    assert plans[(3, True, True)].cpu > plans[(3, True, False)].cpu > 0


# ------------------------------------------------------------------ CLI and launcher
def run_plan_cli(capsys, *extra: str) -> str:
    from beitdist.cli import main

    assert main(["plan", LARGE_IN22K, "--gpus", "16", *extra]) == 0
    return capsys.readouterr().out


def test_cli_names_the_stage_that_fits(capsys) -> None:
    out = run_plan_cli(capsys, "--gpu-mem", "16GB")
    assert "325.8M parameters" in out  # 21,841 classes: 22.4M more than BEiT-L with 1000
    assert len(re.findall(r"^  ZeRO-", out, re.M)) == len(SETTINGS)
    chosen = re.search(r"smallest setting that fits 16GB: (.+)$", out, re.M).group(1).strip()
    assert chosen == smallest_fit(in22k_plans(), 16 * GIB).name


def test_every_setting_name_survives_the_cli_table() -> None:
    """The CLI takes the setting's name from its table row (text before the first double space):
    even the longest name must come out whole."""
    for p in in22k_plans():
        assert p.describe().split("  ")[0] == p.name
    assert plan(10**9, 8, 3, "bf16", True, True).name == "ZeRO-3 +opt offload +param offload"


def test_cli_too_small_gpu(capsys) -> None:
    out = run_plan_cli(capsys, "--gpu-mem", "4GB")
    assert re.search(r"fits 4GB: none \(add ranks, lower the batch, or turn on activation checkpointing\)", out)


def test_launch_plan_uses_the_recipe_setting() -> None:
    from beitdist.launcher import make_plan
    from beitdist.recipe import load_recipe

    recipe = load_recipe(LARGE_IN22K, [])
    launch = make_plan(recipe, use_gpu=True)
    zero3 = next(p for p in in22k_plans() if (p.stage, p.offload_optimizer) == (3, False))
    assert launch.zero_stage == 3
    assert launch.per_rank_gib == pytest.approx(zero3.device_total / GIB)


@pytest.mark.parametrize(("extra", "message"), [
    (["--gpus", "-2"], "--gpus: expected a number of ranks >= 1, got -2"),
    (["--gpus", "0"], "--gpus: expected a number of ranks >= 1, got 0"),
    (["--gpu-mem", "80gigs"], "--gpu-mem: expected a positive size like 80GB"),
    (["--gpu-mem=-4GB"], "--gpu-mem: expected a positive size like 80GB"),
])
def test_bad_plan_arguments_are_refused_before_any_output(capsys, extra, message) -> None:
    from beitdist.cli import main

    assert main(["plan", LARGE_IN22K, *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"beitdist plan: error: {message}")


def test_gpu_memory_gb_is_the_default_device_size_of_plan(capsys) -> None:
    from beitdist.cli import main

    assert main(["plan", LARGE_IN22K, "--gpus", "16", "--set", "scaling.gpu_memory_gb=16"]) == 0
    chosen = re.search(r"smallest setting that fits 16 GB \(scaling.gpu_memory_gb\): (.+)$", capsys.readouterr().out,
                       re.M).group(1).strip()
    assert chosen == smallest_fit(in22k_plans(), 16 * GIB).name


def test_launch_refuses_a_plan_that_does_not_fit_gpu_memory_gb(capsys, tmp_path) -> None:
    from beitdist.launcher import make_plan
    from beitdist.recipe import load_recipe

    recipe = load_recipe(LARGE_IN22K, ["scaling.gpu_memory_gb=4"])
    launch = make_plan(recipe, use_gpu=True)
    assert not launch.fits and "does NOT fit in 4 GiB" in launch.describe(recipe)
    assert launch.fit_problem().startswith("scaling.gpu_memory_gb: the plan needs ~")
    roomy = make_plan(load_recipe(LARGE_IN22K, ["scaling.gpu_memory_gb=80"]), use_gpu=True)
    assert roomy.fits and roomy.fit_problem() is None and "fits in 80 GiB" in roomy.describe(recipe)
    assert make_plan(recipe, use_gpu=False).fits  # CPU workers: GPU memory does not apply

    from beitdist.cli import main

    code = main(["launch", LARGE_IN22K, "--dry-run", "--set", "scaling.gpu_memory_gb=4", "--set",
                 "scaling.use_gpu=true", "--set", f"output_dir={tmp_path}"])
    captured = capsys.readouterr()
    assert code == 2 and "does NOT fit" in captured.out
    assert captured.err.strip().splitlines()[0].startswith("beitdist launch: error: scaling.gpu_memory_gb: the plan")


def test_frozen_parameters_have_weights_but_no_gradients_or_optimizer_states() -> None:
    from beitdist.recipe import load_recipe

    recipe = load_recipe(LARGE_IN22K, ["model.freeze=[backbone]"])
    backbone = recipe.model.backbone_config()
    full = count_parameters(backbone, recipe.head.name, recipe.head.options)
    probe = count_parameters(backbone, recipe.head.name, recipe.head.options, recipe.model.freeze)
    assert int(probe) == int(full) and full.trainable == int(full)
    assert 0 < probe.trainable < int(full) / 10  # the 21,841-class head only
    frozen, trained = plan(probe, 16, 2, "bf16"), plan(full, 16, 2, "bf16")
    assert frozen.weights == trained.weights
    assert frozen.gradients == pytest.approx(trained.gradients * probe.trainable / int(full))
    assert frozen.optimizer == pytest.approx(trained.optimizer * probe.trainable / int(full))
    from beitdist.launcher import make_plan

    assert "trainable, the rest frozen by model.freeze" in make_plan(recipe, use_gpu=True).describe(recipe)


def test_forward_flops_match_the_hand_count_and_the_published_beit_b():
    from beitdist.backbone.config import variant
    from beitdist.plan import forward_flops, peak_flops

    cfg = variant("tiny", image_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2)
    n, d, hidden = 1 + 16, 64, 256
    per_block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * hidden
    hand = 2 * per_block + 2 * 16 * (3 * 8 * 8) * d + 2 * d * 10
    assert forward_flops(cfg, "classification", {"num_classes": 10}) == hand
    base = forward_flops(variant("base"), "classification", {"num_classes": 1000})
    assert round(base / 2e9, 1) == 17.6  # BEiT-B/16 at 224: 17.6 G multiply-adds
    assert forward_flops(variant("tiny", image_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2),
                         "segmentation", {"num_classes": 5, "channels": 16, "auxiliary_channels": 8,
                                          "block_indices": [0, 1, 2, 3]}) > 0
    assert peak_flops("NVIDIA H200", "bf16") == 989e12 and peak_flops("NVIDIA H200", "fp32") is None
    assert peak_flops("Some GPU", "bf16") is None
