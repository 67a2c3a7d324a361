"""`beitdist launch`: dry-run plans, bad input, the launch environment. The end-to-end launch of 2 Ray
workers (a killed worker, Ctrl-C, a relaunch) is tests/test_faults.py."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from beitdist.distributed import free_port
from tests.distributed import TINY_RECIPE, merge


def _launch(args, cwd, timeout=600):
    return subprocess.run([sys.executable, "-m", "beitdist", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout, env={**os.environ, "RAY_AUTH_MODE": "disabled"})


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


def test_ray_workers_find_beitdist_run_from_a_source_checkout(tmp_path, monkeypatch):
    """`python -m beitdist launch` in a clone that is not installed finds beitdist only through the
    working directory, and Ray starts its workers elsewhere: the launcher hands them the checkout
    through PYTHONPATH (before the user's own). Installed (its folder on sys.path): nothing."""
    from pathlib import Path

    from beitdist.launcher import checkout_pythonpath

    root = str(Path(__file__).resolve().parent.parent)
    ray_first = "/opt/ray/thirdparty_files"  # importing Ray puts this before the working directory
    monkeypatch.chdir(root)
    monkeypatch.setenv("PYTHONPATH", "/opt/mine")
    assert checkout_pythonpath([ray_first, root, "/usr/lib/python3.11"]) == os.pathsep.join([root, "/opt/mine"])
    monkeypatch.delenv("PYTHONPATH")
    assert checkout_pythonpath(["", "/usr/lib/python3.11"]) == root  # editable: found by an import hook
    monkeypatch.chdir(tmp_path)
    assert checkout_pythonpath([ray_first, str(tmp_path), root]) is None  # installed where sys.path looks


BAD_LAUNCHES = {
    "malformed_yaml": ("name: [unclosed\n", "not valid YAML"),
    "unknown_key": ("optim: {lrr: 0.1}\n", "optim.lrr: unknown option (did you mean 'lr'?)"),
    "unknown_head": ("head: {name: clasification}\n", "unknown head 'clasification' (did you mean 'classification'?)"),
    "unknown_dataset": ("data: {dataset: imagefolder}\n", "unknown dataset 'imagefolder'"),
    "missing_data": ("data: {dataset: image_folder, options: {root: /nonexistent/imgs}}\n",
                     "data.options.root: '/nonexistent/imgs' does not exist on this machine"),
}


@pytest.mark.parametrize("case", sorted(BAD_LAUNCHES))
def test_bad_input_exits_2_with_one_line_before_anything_starts(tmp_path, case):
    text, expected = BAD_LAUNCHES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(f"output_dir: {tmp_path / 'runs'}\n" + text)
    out = _launch(["launch", str(path)], tmp_path, timeout=120)
    assert out.returncode == 2, out.stderr[-3000:]
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0] and str(path) in lines[0], out.stderr
    assert not (tmp_path / "runs").exists() and out.stdout == ""


def test_worker_failures_are_unwrapped_into_one_line_with_the_right_exit_code(tmp_path):
    """Ray wraps a worker's exception (WorkerGroupError -> RayTaskError(cause=...)); the CLI shows
    the worker's own error, exit 2 for bad input found by the workers, 1 for anything else."""
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from beitdist.launcher import _run_failed, root_cause
    from beitdist.recipe import parse_recipe

    from beitdist.data.base import CorruptImageError

    recipe = parse_recipe({"name": "r", "output_dir": str(tmp_path)})
    bad_image = CorruptImageError("/data/x.jpg", "truncated")
    wrapped = RayTaskError("train_fn", "Traceback ...", bad_image)
    error = WorkerGroupError("snippet", {1: RuntimeError("rank 1 lost its peer"), 0: wrapped})
    assert root_cause(error) is bad_image
    failed = _run_failed(recipe, error, max_failures=3)
    assert failed.exit_code == 2 and "\n" not in str(failed)
    assert "CorruptImageError: cannot decode image /data/x.jpg: truncated" in str(failed)
    assert "after 3 restarts" in str(failed) and "no checkpoint was written" in str(failed)
    crash = _run_failed(recipe, WorkerGroupError("snippet", {0: MemoryError("out of memory")}), max_failures=0)
    assert crash.exit_code == 1 and "MemoryError: out of memory" in str(crash)
    bug = _run_failed(recipe, WorkerGroupError("snippet", {0: ValueError("a bug, not input")}), max_failures=0)
    assert bug.exit_code == 1  # only InputError is bad input


def test_ray_worker_setup_hook_is_light_and_quiets_only_the_noise():
    """The hook Ray runs first in every process of a launch: importable without torch (most of
    those processes never train), and it quiets exactly the listed loggers (Ray Train's
    per-report logger among them, unless the launch is verbose) and warning."""
    from beitdist.launcher import WORKER_SETUP_HOOK

    module, _, function = WORKER_SETUP_HOOK.rpartition(".")
    probe = (f"import sys, logging, warnings; import ray; import {module} as m; assert 'torch' not in sys.modules, 'torch imported'; "
             f"m.{function}(); "
             "assert logging.getLogger('ray.train.v2._internal.execution.controller.placement_group_cleaner')"
             ".getEffectiveLevel() == logging.ERROR; "
             "assert logging.getLogger(m._report_logger_name() or '').level == logging.WARNING; "
             "warnings.warn('`torch.distributed.all_gather_into_tensor` is deprecated', FutureWarning); "
             "print('ok')")
    done = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-c", probe], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
