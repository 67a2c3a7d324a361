"""Model EMA (`train.ema`): the sharded average, its swap into the model, its checkpoint files.

The unit tests run the average on real gloo groups of 1-3 processes with a model every rank holds
whole (the ZeRO 0-2 / fairscale OSS case) and check it against the average computed by hand on
one process. The end-to-end tests train with DeepSpeed on 2 ranks: ZeRO-3 (each rank averages its
own partition) against ZeRO-2, a resume on the same and on another world size, and decay 0 (the
average is the weights themselves: known answer for the swap and the consolidation)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file
from torch import nn

from beitdist.backbone.convert import CheckpointError
from beitdist.engines.shards import piece, replicated_shards
from beitdist.recipe import parse_recipe
from beitdist.run.checkpoints import consolidated_state_dict
from beitdist.run.ema import ModelEma, ema_state_dict, shard_file
from tests.distributed import TINY_RECIPE, merge, result_of, run_recipe

SHAPES = {"a": (7, 3), "b": (5,), "c": (1,), "frozen": (4,)}
DECAY = 0.75


def _model() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Module()
    for name, shape in SHAPES.items():
        model.register_parameter(name, nn.Parameter(torch.randn(shape), requires_grad=name != "frozen"))
    return model


def _weights_at(step: int) -> dict[str, torch.Tensor]:
    """What an optimizer would have made of the weights after `step` steps (any sequence will do)."""
    gen = torch.Generator().manual_seed(100 + step)
    return {name: torch.randn(shape, generator=gen) for name, shape in SHAPES.items() if name != "frozen"}


def _by_hand(steps: int) -> dict[str, torch.Tensor]:
    model = _model()
    ema = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    for step in range(1, steps + 1):
        for name, value in _weights_at(step).items():
            ema[name] = DECAY * ema[name] + (1 - DECAY) * value
    return ema


class _Engine:
    """Every rank holds the whole model (ZeRO 0-2, fairscale OSS)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.released = 0

    def parameter_shards(self):
        return replicated_shards(self.module, dist.get_rank(), dist.get_world_size())

    def release_gathered(self) -> None:
        self.released += 1


def _train(ema: ModelEma, module: nn.Module, steps: range) -> None:
    for step in steps:
        with torch.no_grad():
            for name, value in _weights_at(step).items():
                getattr(module, name).copy_(value)
        ema.update()


def _average(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        module = _model()
        engine = _Engine(module)
        ema = ModelEma(engine, DECAY)
        _train(ema, module, range(1, 4))
        trained = {name: p.detach().clone() for name, p in module.named_parameters()}
        seen = {}
        with ema.swapped_in():
            seen = {name: p.detach().clone() for name, p in module.named_parameters()}
        after = {name: p.detach().clone() for name, p in module.named_parameters()}
        tag_dir = Path(out, "step_3")
        ema.save(tag_dir)
        dist.barrier()
        # a second run on this world size resumes the average saved by the first (any world size)
        resumed_module = _model()
        resumed = ModelEma(_Engine(resumed_module), DECAY)
        source = Path(out).parent / "world2" / "step_3"
        assert resumed.load(source)
        _train(resumed, resumed_module, range(4, 6))
        with resumed.swapped_in():
            continued = {name: p.detach().clone() for name, p in resumed_module.named_parameters()}
        torch.save({"trained": trained, "seen": seen, "after": after, "continued": continued,
                    "updates": resumed.updates, "released": engine.released}, Path(out, f"rank_{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _spawn(world: int, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"world{world}"
    out.mkdir(exist_ok=True)
    mp.spawn(_average, args=(world, f"file://{tmp_path / f'rendezvous{world}'}", str(out)), nprocs=world, join=True)
    return [torch.load(out / f"rank_{r}.pt") for r in range(world)]


def test_pieces_are_zero3_partitions():
    # DeepSpeed's ZeRO-3: ceil(numel / world) per rank, the tail pieces shorter or empty
    assert [piece(10, r, 4) for r in range(4)] == [(0, 3), (3, 6), (6, 9), (9, 10)]
    assert [piece(2, r, 3) for r in range(3)] == [(0, 1), (1, 2), (2, 2)]
    assert [piece(1, r, 3) for r in range(3)] == [(0, 1), (1, 1), (1, 1)]
    for numel in range(1, 30):
        for world in range(1, 6):
            cuts = [piece(numel, r, world) for r in range(world)]
            assert cuts[0][0] == 0 and cuts[-1][1] == numel
            assert all(a[1] == b[0] for a, b in zip(cuts, cuts[1:]))


def test_sharded_average_swap_save_and_resume_at_any_world_size(tmp_path):
    """World 2 averages, swaps, saves; worlds 1, 2 and 3 each resume world 2's average and go on:
    every rank sees the hand-computed average during the swap and its own weights after it."""
    ranks = _spawn(2, tmp_path)
    expected = _by_hand(3)
    for record in ranks:
        for name, value in expected.items():
            torch.testing.assert_close(record["seen"][name], value, rtol=1e-6, atol=1e-7)
        assert torch.equal(record["seen"]["frozen"], _model().frozen)  # not averaged: never changes
        for name, value in record["trained"].items():
            assert torch.equal(record["after"][name], value), f"{name} not put back bit for bit"
        assert record["released"] == 2  # before writing the average, and before putting the weights back
    saved = ema_state_dict(tmp_path / "world2" / "step_3")
    assert sorted(saved) == ["a", "b", "c"]
    for name, value in expected.items():
        torch.testing.assert_close(saved[name], value, rtol=1e-6, atol=1e-7)
    continued_by_hand = _by_hand(5)
    for world in (1, 2, 3):
        records = ranks if world == 2 else _spawn(world, tmp_path)
        for record in records:
            assert record["updates"] == 5
            for name, value in continued_by_hand.items():
                torch.testing.assert_close(record["continued"][name], value, rtol=1e-6, atol=1e-7)


def test_a_missing_rank_file_is_a_clear_error(tmp_path):
    _spawn(2, tmp_path)
    tag_dir = tmp_path / "world2" / "step_3"
    shard_file(tag_dir, 1).unlink()
    with pytest.raises(CheckpointError, match=r"the EMA of a is incomplete .*a rank's file is missing"):
        ema_state_dict(tag_dir)
    with pytest.raises(CheckpointError, match="holds no model EMA"):
        ema_state_dict(tmp_path)


def test_recipe_section():
    recipe = parse_recipe({"train": {"ema": {"enabled": True, "decay": 0.99}}}, plugins=False)
    assert recipe.train.ema.enabled and recipe.train.ema.final == "ema" and recipe.train.ema.evaluate
    with pytest.raises(Exception, match=r"train\.ema\.decay: expected 0 <= decay < 1, got 1.0"):
        parse_recipe({"train": {"ema": {"decay": 1.0}}}, plugins=False)
    with pytest.raises(Exception, match=r"train\.ema\.enabled: model EMA is not available with engine\.fairscale_mode"):
        parse_recipe({"train": {"ema": {"enabled": True}},
                      "engine": {"backend": "fairscale", "fairscale_mode": "fsdp"}}, plugins=False)


# ------------------------------------------------------------------------ end to end
EMA_RECIPE = merge(TINY_RECIPE, {
    "model": {"backbone": {"drop_path_rate": 0.0}},  # per-rank randomness would differ across world sizes
    "engine": {"zero_stage": 3}, "scaling": {"global_batch_size": 16},
    "train": {"steps": 6, "checkpoint_every": 3, "keep_checkpoints": 2, "ema": {"enabled": True, "decay": 0.8}},
})


def _final(recipe: dict, tmp_path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    final = tmp_path / "runs" / recipe["name"] / "final"
    return load_file(str(final / "model.safetensors")), json.loads((final / "beitdist_config.json").read_text())


def _assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


@pytest.mark.slow
def test_ema_under_zero3_resumes_exactly_and_matches_zero2_and_fairscale(tmp_path):
    whole = merge(EMA_RECIPE, {"name": "whole"})
    run_recipe(whole, tmp_path)
    result = result_of(whole, tmp_path)
    metrics = result["metrics"]
    assert {"val_ema_loss", "val_ema_top1", "val_ema_top5"} <= set(metrics)
    assert metrics["val_ema_loss"] != metrics["val_loss"]
    assert result["final_weights"] == "ema"
    weights, config = _final(whole, tmp_path)
    assert config["weights"] == "ema" and config["ema"] == {"decay": 0.8, "updates": 6}
    checkpoints = tmp_path / "runs/whole/checkpoints"
    assert sorted(p.name for p in (checkpoints / "step_6/beitdist_ema").iterdir()) == [
        "rank_00000.safetensors", "rank_00001.safetensors"]
    manifest = json.loads((checkpoints / "step_6/beitdist_manifest.json").read_text())
    assert "beitdist_ema/rank_00001.safetensors" in manifest["files"]  # committed with the checkpoint
    raw = consolidated_state_dict(checkpoints, "step_6", trust_pickle=True)
    averaged = ema_state_dict(checkpoints / "step_6")
    for name, value in averaged.items():
        assert torch.equal(weights[name], value)  # final/ holds the average
        assert not torch.allclose(value, raw[name], atol=1e-6), f"{name}: the average equals the weights"
    for name in set(raw) - set(averaged):  # buffers (relative position index) as trained
        assert torch.equal(weights[name], raw[name])
    evaluated = subprocess.run([sys.executable, "-m", "beitdist", "evaluate", str(tmp_path / "runs/whole")],
                               capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    record = json.loads((tmp_path / "runs/whole/eval/whole.json").read_text())
    assert record["weights"] == "ema"  # evaluating the run evaluates final/, the average: val_ema_* again
    assert record["metrics"] == {k.replace("val_ema_", "val_"): v for k, v in metrics.items() if "_ema_" in k}

    # the same checkpoint resumed on 2 ranks (exactly) and on 1 rank (ZeRO-3 universal checkpoint)
    for name, nproc, atol in (("resumed", 2, 1e-6), ("elastic", 1, 1e-5)):
        recipe = merge(EMA_RECIPE, {"name": name})
        target = tmp_path / "runs" / name / "checkpoints"
        shutil.copytree(checkpoints / "step_3", target / "step_3")
        (target / "latest").write_text("step_3")
        out = run_recipe(recipe, tmp_path, nproc=nproc)
        assert "resumed from step_3" in out.stderr and "holds no model EMA" not in out.stderr
        _assert_close(_final(recipe, tmp_path)[0], weights, atol)
        # on 1 rank the split is not padded to a multiple of 2 ranks (359 images, not 360): the loss
        # and top-1 move a little
        key, tolerance = ("val_ema_loss", 1e-5) if nproc == 2 else ("val_ema_top5", 2 / 359)
        assert result_of(recipe, tmp_path)["metrics"][key] == pytest.approx(metrics[key], abs=tolerance)

    # ZeRO-2 and fairscale OSS keep the same average from pieces of whole parameters
    for name, engine in (("zero2", {"zero_stage": 2}), ("oss", {"backend": "fairscale", "fairscale_mode": "oss"})):
        recipe = {**EMA_RECIPE, "name": name, "engine": engine}
        run_recipe(recipe, tmp_path)
        _assert_close(_final(recipe, tmp_path)[0], weights, 1e-5)
        assert result_of(recipe, tmp_path)["metrics"]["val_ema_top5"] == pytest.approx(metrics["val_ema_top5"])


@pytest.mark.slow
def test_decay_zero_is_the_weights_themselves(tmp_path):
    """Known answer: with decay 0 the average is the last weights, so evaluating it gives the raw
    metrics and the consolidated average is the consolidated checkpoint; final/ holds the raw
    weights when train.ema.final says so."""
    recipe = merge(EMA_RECIPE, {"name": "decay0", "train": {"steps": 3, "checkpoint_every": 0,
                                                            "ema": {"decay": 0.0, "final": "raw"}}})
    run_recipe(recipe, tmp_path)
    metrics = result_of(recipe, tmp_path)["metrics"]
    for key in ("loss", "top1", "top5"):
        assert metrics[f"val_ema_{key}"] == pytest.approx(metrics[f"val_{key}"], abs=1e-6)
    checkpoints = tmp_path / "runs/decay0/checkpoints"
    raw = consolidated_state_dict(checkpoints, "step_3", trust_pickle=True)
    for name, value in ema_state_dict(checkpoints / "step_3").items():
        assert torch.equal(value, raw[name]), name
    weights, config = _final(recipe, tmp_path)
    assert config["weights"] == "raw"
    _assert_close(weights, raw, 0.0)
