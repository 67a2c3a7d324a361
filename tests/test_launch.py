"""`beitdist launch`: Ray Train with 2 DeepSpeed workers end to end, dry-run plans, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import yaml

from beitdist.engine import free_port
from tests.distributed import TINY_RECIPE, merge


def _launch(args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "beitdist", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled"})


@pytest.mark.slow
def test_launch_two_ray_workers_end_to_end(tmp_path):
    recipe = merge(TINY_RECIPE, {"name": "launched", "output_dir": str(tmp_path / "runs"),
                                 "engine": {"preset": "zero2"}, "scaling": {"num_workers": 2},
                                 "train": {"steps": 6, "checkpoint_every": 3, "eval_every": 3}})
    path = tmp_path / "launched.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = _launch([str(path)][:0] + ["launch", str(path)], tmp_path)
    assert out.returncode == 0, out.stderr[-4000:]
    assert "workers        2 x CPU" in out.stdout and "finished launched at step 6" in out.stdout
    result = json.loads((tmp_path / "runs/launched/train_result.json").read_text())
    assert result["world_size"] == 2 and len(result["losses"]) == 6
    assert (tmp_path / "runs/launched/final/model.safetensors").exists()
    # launching the same run name again resumes it: nothing left to do, same result
    again = _launch(["launch", str(path)], tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resumed from step_6" in again.stdout + again.stderr


def test_dry_run_prints_the_plan_without_starting_anything(tmp_path):
    recipe = merge(TINY_RECIPE, {"name": "dry", "output_dir": str(tmp_path / "runs"), "scaling": {"num_workers": 4},
                                 "engine": {"zero_stage": 3}})
    path = tmp_path / "dry.yaml"
    path.write_text(yaml.safe_dump(recipe))
    out = _launch(["launch", str(path), "--dry-run"], tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "workers        4 x" in out.stdout and "DeepSpeed ZeRO-3" in out.stdout
    assert "8 per rank x 1 accumulation x 4 ranks = 32 global" in out.stdout
    assert not (tmp_path / "runs").exists()


def test_unreachable_address_exits_2_quickly(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(merge(TINY_RECIPE, {"output_dir": str(tmp_path / "runs")})))
    start = time.time()
    out = _launch(["launch", str(path), "--address", f"127.0.0.1:{free_port()}"], tmp_path, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    assert "cannot connect to 127.0.0.1" in out.stderr and "Traceback" not in out.stderr
    assert time.time() - start < 240
