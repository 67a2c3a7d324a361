"""`beitdist tune`: the search space sampled and checked against the recipe before anything starts,
trials packed by the memory plan, and a real sweep on the local Ray (ASHA stops trials early, one
MLflow parent run holds the best trial, a sweep whose driver is killed resumes without repeating
finished trials)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from beitdist.cli import main
from beitdist.plan import GIB
from beitdist.recipe import parse_recipe
from beitdist.sweep.packing import TrialResources, pack, trial_resources
from beitdist.sweep.space import parse_space, sample_trials
from beitdist.sweep.spec import SweepError

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "recipes" / "quickstart.yaml"
# the quickstart model, 1 worker per trial, tens of steps
SHORT = ["--set", "train.steps=30", "--set", "train.eval_every=10", "--set", "train.checkpoint_every=10",
         "--set", "train.log_every=0", "--set", "scaling.num_workers=1", "--set", "optim.min_lr=0",
         "--set", "optim.warmup_steps=3"]


def _dry_run(tmp_path: Path, search: dict, *extra: str) -> list[str]:
    spec = tmp_path / "search.yaml"
    spec.write_text(yaml.safe_dump(search))
    return ["tune", str(QUICKSTART), "--search", str(spec), "--dry-run", *SHORT,
            "--set", f"output_dir={tmp_path / 'runs'}", *extra]


@pytest.mark.parametrize(("search", "extra", "expected"), [
    ({"search": {"optim.lrr": {"loguniform": [1e-4, 1e-2]}}}, (), "search.optim.lrr: not a recipe key"),
    ({"search": {"train.steps": {"loguniform": [10, 100]}}}, (), "search.train.steps: loguniform [10, 100]"),
    ({"search": {"optim.layer_decay": {"uniform": [0.5, 1.5]}}}, (),
     "includes 1.5, which the recipe refuses (optim.layer_decay: expected a value in (0, 1]"),
    ({"search": {"optim.layer_decay": {"choice": [1.5, 2.0]}}}, (), "has no value the recipe accepts"),
    ({"search": {"optim.lr": {"loguniform": [1e-2, 1e-4]}}}, (), "holds no value: expected low < high"),
    ({"search": {"optim.lr": {"normal": [0, 1]}}}, (), "unknown distribution 'normal'; allowed: uniform"),
    ({"search": {"optim.lr": {"choice": [1e-3]}}, "trails": 3}, (), "trails"),
    ({"search": {"optim.lr": {"choice": [1e-3]}}}, ("--set", "scaling.num_workers=64"),
     "a trial needs 64 workers x {CPU 1, memory"),
    ({"search": {"optim.lr": {"choice": [1e-3]}}}, ("--set", "scaling.resources_per_worker.memory=1.0e+15"),
     "the cluster has 0 such worker slots"),
    ({"search": {"optim.lr": {"choice": [1e-3]}}}, ("--set", "train.eval_every=0"), "train.eval_every: a sweep"),
])
def test_bad_sweeps_are_one_line_and_exit_2_before_anything_starts(tmp_path, capsys, search, extra, expected):
    code = main(_dry_run(tmp_path, search, *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("beitdist tune: error: ") and "\n" not in err, err
    assert expected in err, err
    assert not (tmp_path / "runs").exists()  # nothing started, nothing written


def test_the_dry_run_lists_the_trials_their_resources_and_the_concurrency(tmp_path, capsys):
    search = {"search": {"optim.lr": {"loguniform": [1e-4, 1e-2]}, "optim.layer_decay": {"grid": [0.65, 0.85]}},
              "trials": 3}
    assert main(_dry_run(tmp_path, search, "--max-concurrent", "1")) == 0
    out = capsys.readouterr().out
    assert "6 trials of 30 steps" in out and "trial_005" in out and "1 worker x {CPU 1, memory" in out
    assert "-> 1 trial at once" in out
    assert not (tmp_path / "runs").exists()


def test_sampling_is_seeded_and_grids_multiply():
    space = parse_space({"optim.lr": {"loguniform": [1e-4, 1e-2]}, "optim.layer_decay": {"grid": [0.65, 0.85]},
                         "data.batch_size": {"randint": [8, 33]}}, "test")
    trials = sample_trials(space, 5, seed=3)
    assert len(trials) == 10 and [t.name for t in trials][-1] == "trial_009"
    assert [t.values["optim.layer_decay"] for t in trials] == [0.65] * 5 + [0.85] * 5
    assert all(1e-4 <= t.values["optim.lr"] <= 1e-2 and 8 <= t.values["data.batch_size"] < 33 for t in trials)
    assert trials == sample_trials(space, 5, seed=3)
    assert trials != sample_trials(space, 5, seed=4)
    with pytest.raises(SweepError, match="randint expects integers"):
        parse_space({"data.batch_size": {"randint": [8.5, 33]}}, "test")


def test_packing_follows_the_plan():
    recipe = parse_recipe({"model": {"variant": "base"}, "data": {"dataset": "digits", "batch_size": 32}, "scaling": {
        "num_workers": 1, "use_gpu": True, "gpu_memory_gb": 80}}, plugins=False)
    resources = trial_resources(recipe, use_gpu=True)
    # BEiT-B at batch 32 plans ~6-8 GiB per rank: an 80 GB GPU holds several one-worker trials
    share = resources.per_worker["GPU"]
    assert 2 <= 80 // resources.planned_gib and share == 1 / min(8, int(80 // resources.planned_gib))
    nodes = [{"CPU": 16.0, "GPU": 2.0, "memory": 200 * GIB}]
    assert pack(resources, nodes, trials=100, max_concurrent=None).concurrent == int(round(2 / share))
    several = trial_resources(recipe.replace(scaling=recipe.scaling.__class__(
        num_workers=2, use_gpu=True, gpu_memory_gb=80)), use_gpu=True)
    assert several.per_worker["GPU"] == 1.0  # ranks of one run never share a GPU
    assert pack(several, nodes, trials=100, max_concurrent=None).concurrent == 1
    cpu = TrialResources(2, {"CPU": 1.0, "memory": 2 * GIB}, 1.0, spread=True)
    with pytest.raises(SweepError, match="such nodes"):
        pack(cpu, [{"CPU": 8.0, "memory": 64 * GIB}], trials=4, max_concurrent=None)
    assert pack(cpu, [{"CPU": 8.0, "memory": 64 * GIB}] * 2, trials=4, max_concurrent=None).concurrent == 4
    assert pack(cpu, [{"CPU": 8.0, "memory": 64 * GIB}] * 2, trials=4, max_concurrent=3).concurrent == 3


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_a_sweep_on_local_ray_stops_bad_trials_and_resumes_after_its_driver_is_killed(tmp_path):
    spec = tmp_path / "search.yaml"
    # good learning rates first: ASHA has their evaluations when the bad ones reach a rung; the
    # last trial can only start in the slot of one stopped early, whose workers Ray Train must free
    spec.write_text(yaml.safe_dump({"search": {"optim.lr": {"grid": [3e-3, 1e-3, 1e-7, 1e-6, 3e-7]}}, "trials": 1,
                                    "grace_period": 10, "metric": "val_loss"}))
    cmd = [sys.executable, "-m", "beitdist", "tune", str(QUICKSTART), "--search", str(spec), *SHORT,
           "--set", f"output_dir={tmp_path / 'runs'}", "--max-concurrent", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    sweep = tmp_path / "runs" / "quickstart_tune"

    def first_finished() -> Path | None:
        """The result of the first trial to finish (either good lr may be first: ASHA may stop the
        other one at a rung, depending on which reports first)."""
        return next(iter(sorted(sweep.glob("trial_*/train_result.json"))), None)

    log_file = (tmp_path / "first.log").open("w")  # a pipe nobody reads would fill and block the driver
    driver = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while first_finished() is None and driver.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        first_done = first_finished()
        assert first_done is not None, (tmp_path / "first.log").read_text()[-4000:]
        time.sleep(1.0)
    finally:
        # the driver's machine "crashes": it and every process it started (the local Ray instance,
        # the trials' workers) are killed at once
        doomed = [driver.pid, *_descendants(driver.pid)]
        try:
            os.killpg(driver.pid, signal.SIGKILL)  # its own session: Ray's daemons re-parented to init too
        except ProcessLookupError:
            pass
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        driver.wait(timeout=60)
        log_file.close()
    first_result = first_done.read_bytes()
    first_trial = first_done.parent.name
    first_worker = (sweep / first_trial / "workers" / "rank_0.json").read_bytes()

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600,
                           start_new_session=True)
    assert again.returncode == 0, (again.stdout + again.stderr)[-5000:]
    assert "restoring sweep quickstart_tune" in again.stdout
    # the finished trial did not train again: same result, no new worker attempt
    assert first_done.read_bytes() == first_result
    assert (sweep / first_trial / "workers" / "rank_0.json").read_bytes() == first_worker

    summary = json.loads((sweep / "sweep_result.json").read_text())
    statuses = {t["name"]: t["status"] for t in summary["trials"]}
    assert statuses[first_trial] == "finished" and first_trial in ("trial_000", "trial_001")
    assert "stopped early" in statuses.values(), statuses
    best = summary["best"]
    assert best["values"]["optim.lr"] in (3e-3, 1e-3) and best["metric"] < 2.3
    from beitdist.checkpoint import load_model

    model = load_model(best["final_dir"], head="auto")
    assert model.head_name == "classification"

    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{sweep / 'mlflow.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    parent = next(r for r in runs if r.info.run_name == "quickstart_tune")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["search.optim.lr"].startswith("grid")
    assert float(parent.data.params["best.optim.lr"]) == best["values"]["optim.lr"]
    assert parent.data.metrics["best_val_loss"] == pytest.approx(best["metric"])
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"sweep.png", "sweep_result.json"}
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == [f"trial_00{i}" for i in range(5)
                                                         if statuses[f"trial_00{i}"] != "not run"]
    assert statuses["trial_004"] != "not run"  # it got the slot of a trial stopped early
    assert all(r.info.status != "RUNNING" for r in children)


def test_a_bad_space_is_refused_before_ray_starts(tmp_path, capsys):
    import ray

    args = [a for a in _dry_run(tmp_path, {"search": {"optim.lr": {"uniform": [-1.0, 1.0]}}}) if a != "--dry-run"]
    assert main(args) == 2
    assert "search.optim.lr: uniform [-1.0, 1.0] includes -1" in capsys.readouterr().err
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()
