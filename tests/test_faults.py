"""Fault tolerance under `beitdist launch`: a worker process SIGKILLed in the middle of a run.

Ray Train notices the dead worker, tears the worker group down and starts a new one
(FailureConfig.max_failures); every new worker resumes from the newest complete checkpoint. Since
model randomness is a function of (seed, step, rank) and the sampler's position is checkpointed,
the final weights must equal those of an uninterrupted run, and the MLflow run must continue
(one run, every step logged exactly once).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.distributed import TINY_RECIPE, merge, run_recipe

pytestmark = pytest.mark.slow

STEPS, EVERY = 40, 10
RECIPE = merge(TINY_RECIPE, {
    "name": "faulty",
    # a little larger than TINY so that 40 steps take long enough to be interrupted
    "model": {"backbone": {"embed_dim": 64, "depth": 4, "num_heads": 4, "image_size": 32, "patch_size": 8}},
    "data": {"batch_size": 16},
    "engine": {"zero_stage": 2},
    "train": {"steps": STEPS, "checkpoint_every": EVERY, "eval_every": 0, "keep_checkpoints": 5},
})


def _train_workers(launcher: psutil.Process) -> list[psutil.Process]:
    """The Ray Train worker processes this launch started (children of its local Ray instance)."""
    found = []
    for proc in launcher.children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()) or "RayTrainWorker" in proc.name():
                found.append(proc)
        except psutil.Error:
            continue
    return found


def _progress_step(run_dir: Path) -> int:
    try:
        return int(json.loads((run_dir / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def _kill_one_worker_after(launcher: subprocess.Popen, run_dir: Path, step: int, timeout: float) -> int:
    """SIGKILL one training worker once rank 0 reports `step`; returns the step it was killed at."""
    parent = psutil.Process(launcher.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert launcher.poll() is None, "the launch ended before a worker could be killed"
        at = _progress_step(run_dir)
        if at >= step:
            workers = _train_workers(parent)
            if len(workers) == 2:
                victim = workers[-1]
                os.kill(victim.pid, signal.SIGKILL)
                return at
        time.sleep(0.05)
    raise AssertionError(f"no progress to step {step} within {timeout} s")


def test_sigkilled_worker_is_restarted_and_the_run_ends_as_if_nothing_happened(tmp_path):
    reference = merge(RECIPE, {"name": "reference"})
    run_recipe(reference, tmp_path, timeout=600)

    recipe = merge(RECIPE, {"output_dir": str(tmp_path / "runs"), "scaling": {"num_workers": 2, "max_failures": 2},
                            "tracking": {"enabled": True}})
    path = tmp_path / "faulty.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "runs" / "faulty"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    log = (tmp_path / "launch.log").open("w")
    launcher = subprocess.Popen([sys.executable, "-m", "beitdist", "-v", "launch", str(path)], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        killed_at = _kill_one_worker_after(launcher, run_dir, EVERY + 1, timeout=400)
        launcher.wait(timeout=600)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        log.close()
    output = (tmp_path / "launch.log").read_text()
    assert launcher.returncode == 0, output[-6000:]
    assert killed_at < STEPS
    assert "resumed from step_" in output, output[-6000:]

    result = json.loads((run_dir / "train_result.json").read_text())
    assert result["step"] == STEPS and result["world_size"] == 2
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    expected = load_file(str(tmp_path / "runs" / "reference" / "final" / "model.safetensors"))
    assert sorted(final) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, atol=1e-5, rtol=1e-4, msg=key)

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("beitdist").experiment_id])
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps  # every step once, replayed ones not twice
