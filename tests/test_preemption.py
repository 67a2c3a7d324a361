"""Pre-emption (SIGTERM): the run stops after the current step with a checkpoint of it, and a
relaunch resumes there to the same weights as an uninterrupted run (beitdist.run.preemption)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from beitdist.run import preemption
from beitdist.run.checkpoints import checkpoint_problems, read_latest
from beitdist.run.trainer import PreemptedError
from tests.distributed import TINY_RECIPE, child_pids, merge, progress_step, result_of, run_recipe, start_torchrun


@pytest.fixture
def restore_sigterm():
    previous = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, previous)


def test_sigterm_is_recorded_and_a_second_one_ignored(restore_sigterm, caplog):
    assert preemption.install()
    with preemption.training():
        assert not preemption.requested()
        os.kill(os.getpid(), signal.SIGTERM)
        assert preemption.requested()
        os.kill(os.getpid(), signal.SIGTERM)  # during the save: logged, the process goes on
        assert preemption.requested()
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["signal 15", "signal 15 again"]
    with preemption.training():  # a new loop starts without the old request
        assert not preemption.requested()
    assert PreemptedError("x").exit_code == 143


def test_ray_workers_hand_sigterm_to_ray_unless_a_loop_trains(restore_sigterm):
    import ray._private.utils as ray_utils

    from beitdist.ray_worker_setup import intercept_sigterm

    original = ray_utils.set_sigterm_handler
    calls: list[int] = []
    try:
        intercept_sigterm()
        intercept_sigterm()  # idempotent: wrapped once
        ray_utils.set_sigterm_handler(lambda signum, frame: calls.append(signum))  # what Ray's main_loop does
        os.kill(os.getpid(), signal.SIGTERM)
        assert calls == [signal.SIGTERM]  # no loop: Ray's handler (the worker exits as Ray intends)
        with preemption.training():
            os.kill(os.getpid(), signal.SIGTERM)
            assert calls == [signal.SIGTERM] and preemption.requested()
    finally:
        ray_utils.set_sigterm_handler = original




@pytest.mark.slow
def test_sigterm_to_one_rank_checkpoints_that_step_and_the_relaunch_finishes_the_same(tmp_path):
    base = merge(TINY_RECIPE, {"engine": {"zero_stage": 2}, "train": {"steps": 150, "checkpoint_every": 100,
                                                                      "log_every": 0}})
    whole = merge(base, {"name": "whole"})
    run_recipe(whole, tmp_path)

    recipe = merge(base, {"name": "preempted", "output_dir": str(tmp_path / "runs")})
    path = tmp_path / "preempted.yaml"
    path.write_text(yaml.safe_dump(recipe))
    torchrun = start_torchrun(path, cwd=tmp_path)
    run_dir = tmp_path / "runs/preempted"
    try:
        deadline = time.monotonic() + 240
        while progress_step(run_dir) < 2 and torchrun.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        ranks = child_pids(torchrun.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[1], signal.SIGTERM)  # one rank, as a node's kubelet would
        time.sleep(0.02)  # two signals at once are one for Python's handler
        with contextlib.suppress(ProcessLookupError):  # impatient: the second lands in the step, the save or the exit
            os.kill(ranks[1], signal.SIGTERM)
        out, err = torchrun.communicate(timeout=240)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
    assert torchrun.returncode != 0
    stopped = [line for line in err.splitlines() if "on SIGTERM (pre-emption)" in line]
    assert stopped, err[-3000:]
    step = int(stopped[0].split("stopped after step ")[1].split()[0])
    assert 2 <= step < 150 and step != 100, step  # not a periodic checkpoint (100), before the end
    # wherever the second signal landed (test_sigterm_is_recorded_and_a_second_one_ignored pins
    # what the handler does with it), the checkpoint of the step is complete and `latest`
    checkpoints = run_dir / "checkpoints"
    assert read_latest(checkpoints) == f"step_{step}" and checkpoint_problems(checkpoints / f"step_{step}") == []
    assert not (run_dir / "final").exists()

    out = run_recipe(merge(base, {"name": "preempted"}), tmp_path)
    assert f"resumed from step_{step} at step {step}" in out.stderr
    result = result_of(recipe, tmp_path)
    assert result["losses"] == pytest.approx(result_of(whole, tmp_path)["losses"][step:], abs=1e-6)
    a = load_file(str(tmp_path / "runs/whole/final/model.safetensors"))
    b = load_file(str(run_dir / "final/model.safetensors"))
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)


DRAIN_SCRIPT = """
import json, sys
from beitdist.recipe import parse_recipe
from beitdist.train import run

calls = []

def probe():
    calls.append(1)
    return "Ray is draining node(s) n1" if len(calls) == 2 else None

result = run(parse_recipe(json.loads(sys.argv[1])), drain_probe=probe)
print(json.dumps({"calls": len(calls), "step": result.step}))
"""


def test_a_drain_notice_checkpoints_that_step_and_training_goes_on(tmp_path):
    """Ray's node-drain notice (asked every 10 steps, on every rank alike): a checkpoint of that
    step at once, then training continues; the restart after the node is gone resumes there."""
    recipe = merge(TINY_RECIPE, {"name": "drained", "output_dir": str(tmp_path / "runs"),
                                 "train": {"steps": 25, "log_every": 0, "keep_checkpoints": 5}})
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", DRAIN_SCRIPT, json.dumps(recipe)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"calls": 2, "step": 25}  # asked at 10, 20; once
    assert "Ray is draining node(s) n1: checkpointing step 20 now" in done.stderr
    checkpoints = tmp_path / "runs/drained/checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step_*")) == ["step_20", "step_25"]
    assert checkpoint_problems(checkpoints / "step_20") == []
