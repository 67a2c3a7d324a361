"""BEiT's linear probe from a recipe: `model.freeze: [backbone]` through `beitdist launch` (2 Ray
workers, DeepSpeed ZeRO-2) leaves every backbone tensor bit-identical to the checkpoint it started
from, trains a fresh head, and beats chance on the digits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import beitdist
from tests.distributed import merge

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _beitdist(args: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "beitdist", *args], capture_output=True, text=True, env=env,
                            cwd=cwd, timeout=timeout)
    assert result.returncode == 0, f"beitdist {args[0]} failed:\n{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
    return result


def test_linear_probe_through_launch_keeps_the_backbone_bit_identical(tmp_path):
    quickstart = yaml.safe_load((ROOT / "recipes" / "quickstart.yaml").read_text())
    base = merge(quickstart, {"name": "base", "output_dir": str(tmp_path / "runs"),
                              "model": {"backbone": {"embed_dim": 64, "depth": 2, "num_heads": 2}},
                              "train": {"steps": 250, "eval_every": 250, "checkpoint_every": 250, "log_every": 50},
                              "scaling": {"num_workers": 1}, "tracking": {"enabled": False}})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    _beitdist(["train", str(tmp_path / "base.yaml")], tmp_path)  # features worth probing, in one process
    backbone = tmp_path / "backbone"
    _beitdist(["convert", str(tmp_path / "runs" / "base" / "final"), str(backbone), "--to", "beitdist",
               "--head", "none"], tmp_path)

    probe = merge(base, {"name": "probe", "model": {"init": str(backbone), "freeze": ["backbone"]},
                         "engine": {"preset": "zero2"}, "scaling": {"num_workers": 2},
                         "train": {"steps": 60, "eval_every": 60, "checkpoint_every": 60},
                         "optim": {"lr": 0.01, "warmup_steps": 5}})
    (tmp_path / "probe.yaml").write_text(yaml.safe_dump(probe))
    launched = _beitdist(["launch", str(tmp_path / "probe.yaml")], tmp_path)
    assert "trainable, the rest frozen by model.freeze" in launched.stdout  # the plan counts them

    start = beitdist.load_model(backbone).state_dict()
    final = beitdist.load_model(tmp_path / "runs" / "probe" / "final", head="auto")
    trained = final.state_dict()
    backbone_keys = [k for k in start if k.startswith("backbone.")]
    assert backbone_keys and all(torch.equal(start[k], trained[k]) for k in backbone_keys)
    result = json.loads((tmp_path / "runs" / "probe" / "train_result.json").read_text())
    assert result["world_size"] == 2
    assert result["metrics"]["val_top1"] > 0.25, result["metrics"]  # chance: 0.10
    fresh = beitdist.build_model(final.config, "classification", final.head.options())
    assert not torch.equal(fresh.head.classifier.weight, final.head.classifier.weight)


def test_frozen_parameters_stay_bit_identical_under_zero3(tmp_path):
    from tests.distributed import TINY_RECIPE, run_recipe

    torch.manual_seed(0)
    config = beitdist.BackboneConfig(embed_dim=32, depth=2, num_heads=2, image_size=16, patch_size=4)
    beitdist.save_checkpoint(beitdist.build_model(config, "classification", {"num_classes": 10}), tmp_path / "init")
    recipe = merge(TINY_RECIPE, {"name": "frozen3", "engine": {"zero_stage": 3},
                                 "model": {"init": str(tmp_path / "init"), "freeze": ["backbone.blocks.*"]},
                                 "train": {"steps": 6, "checkpoint_every": 6}})
    run_recipe(recipe, tmp_path, nproc=1)
    start = beitdist.load_model(tmp_path / "init", head="auto").state_dict()
    final = beitdist.load_model(tmp_path / "runs" / "frozen3" / "final", head="auto").state_dict()
    blocks = [k for k in start if k.startswith("backbone.blocks.")]
    assert blocks and all(torch.equal(start[k], final[k]) for k in blocks)
    assert not torch.equal(start["backbone.patch_embed.proj.weight"], final["backbone.patch_embed.proj.weight"])
