"""Fault tolerance under `beitdist launch`: a worker process SIGKILLed in the middle of a run, then
Ctrl-C on the driver, then a relaunch.

Ray Train notices the dead worker, tears the worker group down and starts a new one
(FailureConfig.max_failures); every new worker resumes from the newest complete checkpoint, and so
does a relaunch. Since model randomness is a function of (seed, step, rank) and the sampler's
position is checkpointed, the final weights must equal those of an uninterrupted run, and the
MLflow run must continue (one run, every step logged exactly once). Both faults share one launch:
each Ray Train start costs ~40 s on 2 cores.
"""

from __future__ import annotations

import json
import os
import re
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

from tests.distributed import TINY_RECIPE, merge, progress_step, run_recipe

pytestmark = pytest.mark.slow

STEPS, EVERY = 40, 10
RECIPE = merge(TINY_RECIPE, {
    "name": "faulty",
    # a little larger than TINY so that 40 steps take long enough to be interrupted
    "model": {"backbone": {"embed_dim": 64, "depth": 4, "num_heads": 4, "image_size": 32, "patch_size": 8}},
    "data": {"batch_size": 16},
    "engine": {"zero_stage": 2},
    "train": {"steps": STEPS, "checkpoint_every": EVERY, "eval_every": 2 * EVERY, "keep_checkpoints": 5},
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



def _signal_one_worker_after(launcher: subprocess.Popen, run_dir: Path, step: int, timeout: float,
                             sig: signal.Signals, spare: set[int] = frozenset()) -> tuple[int, set[int]]:
    """Send `sig` to one training worker once rank 0 reports `step` and the workers are none of
    `spare` (those of a group Ray has replaced since); returns the step and the workers' pids."""
    parent = psutil.Process(launcher.pid)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert launcher.poll() is None, "the launch ended before a worker could be signalled"
        at = progress_step(run_dir)
        if at >= step:
            workers = _train_workers(parent)
            if len(workers) == 2 and not {w.pid for w in workers} & spare:
                os.kill(workers[-1].pid, sig)
                return at, {w.pid for w in workers}
        time.sleep(0.05)
    raise AssertionError(f"no progress to step {step} within {timeout} s")


def _wait_for(launcher: subprocess.Popen, path: Path, timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert launcher.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
        time.sleep(0.05)


def _launch(path: Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "beitdist", "launch", str(path)], capture_output=True, text=True,
                          cwd=cwd, timeout=600, env={**os.environ, "RAY_AUTH_MODE": "disabled"})


def test_a_killed_worker_and_an_interrupted_launch_end_as_if_nothing_happened(tmp_path):
    """One launch of 2 Ray workers lives through the faults a long run meets, then a relaunch
    finishes it: a worker SIGKILLed after step 10's checkpoint (Ray Train restarts the group, which
    resumes), a worker of the new group SIGTERMed (pre-empted: the group checkpoints the step it
    stops after and the next group resumes there), then Ctrl-C on the driver after step 20's (exit 1 saying so, the Ray workers gone, the
    checkpoints kept). The final weights equal those of an uninterrupted torchrun run, and MLflow
    holds one run with every step once (replayed steps not twice), the evaluations and the artifacts."""
    reference = merge(RECIPE, {"name": "reference"})
    run_recipe(reference, tmp_path, timeout=600)

    recipe = merge(RECIPE, {"output_dir": str(tmp_path / "runs"), "scaling": {"num_workers": 2, "max_failures": 3},
                            "tracking": {"enabled": True}})
    path = tmp_path / "faulty.yaml"
    path.write_text(yaml.safe_dump(recipe))
    run_dir = tmp_path / "runs" / "faulty"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    log_path = tmp_path / "launch.log"
    log = log_path.open("w")
    launcher = subprocess.Popen([sys.executable, "-m", "beitdist", "-v", "launch", str(path)], cwd=tmp_path,
                                stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        killed_at, first_group = _signal_one_worker_after(launcher, run_dir, EVERY + 1, 400, signal.SIGKILL)
        # pre-emption of the restarted group: SIGTERM to one worker between two checkpoints
        _signal_one_worker_after(launcher, run_dir, EVERY + 3, 400, signal.SIGTERM, spare=first_group)
        _wait_for(launcher, run_dir / f"checkpoints/step_{2 * EVERY}/beitdist_manifest.json", 400, log_path)
        workers = [json.loads(p.read_text())["pid"] for p in (run_dir / "workers").glob("rank_*.json")]
        launcher.send_signal(signal.SIGINT)
        code = launcher.wait(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        log.close()
    output = log_path.read_text()
    assert killed_at < 2 * EVERY
    assert f"resumed from step_{EVERY} " in output, output[-6000:]  # the restarted group resumed
    # the pre-empted group saved the step it stopped after, and the next group resumed there
    preempted = re.search(r"stopped after step (\d+) on SIGTERM \(pre-emption\)", output)
    assert preempted, output[-6000:]
    stopped_at = int(preempted.group(1))
    assert EVERY + 3 <= stopped_at < 2 * EVERY, stopped_at
    assert f"resumed from step_{stopped_at} " in output, output[-6000:]
    assert code == 1 and "beitdist launch: interrupted" in output, output[-6000:]
    assert not (run_dir / "train_result.json").exists()
    deadline = time.monotonic() + 60
    while any(psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE for pid in workers):
        assert time.monotonic() < deadline, f"Ray workers {workers} still running after Ctrl-C"
        time.sleep(0.5)

    again = _launch(path, tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "workers        2 x CPU" in again.stdout and f"finished faulty at step {STEPS}" in again.stdout
    # from step 20 (or 30, if the workers saved it before Ray stopped them)
    assert re.search(rf"resumed from step_({2 * EVERY}|{3 * EVERY}) ", again.stdout + again.stderr), again.stderr[-4000:]
    # Ray's and DeepSpeed's noise that reads like a failure is kept out (beitdist.ray_worker_setup)
    for noise in ("Failed to query Ray Train Controller", "all_gather_into_tensor` is deprecated"):
        assert noise not in again.stdout + again.stderr + output, noise

    result = json.loads((run_dir / "train_result.json").read_text())
    assert result["step"] == STEPS and result["world_size"] == 2
    final = load_file(str(run_dir / "final" / "model.safetensors"))
    expected = load_file(str(tmp_path / "runs" / "reference" / "final" / "model.safetensors"))
    assert sorted(final) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, atol=1e-5, rtol=1e-4, msg=key)
    _check_mlflow_store(run_dir)


def _check_mlflow_store(run_dir: Path) -> None:
    """The embedded store in the run dir holds one run (the restart and the relaunch continued it)
    with the recipe as params, every step's metrics once, the evaluations and the artifacts."""
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("beitdist").experiment_id])
    assert run.info.run_id == (run_dir / "mlflow_run_id").read_text() and run.info.status == "FINISHED"
    assert run.data.params["engine.zero_stage"] == "2" and run.data.params["train.steps"] == str(STEPS)
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert sorted(steps) == list(range(1, STEPS + 1)), steps  # every step once, replayed ones not twice
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "val_top1")) == [2 * EVERY, STEPS]
    assert {"recipe.yaml", "final", "pictures"} <= {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "final/model.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "final")}
