"""`beitdist train` says what it runs, like `launch`: the plan for the ranks torchrun started, that
scaling.num_workers is for `launch`, where it resumes from, and a progress line without -v."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from tests.distributed import TINY_RECIPE, merge

pytestmark = pytest.mark.slow


def _train(recipe: dict, tmp_path) -> subprocess.CompletedProcess:
    path = tmp_path / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "beitdist", "train", str(path)], capture_output=True, text=True,
                            env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_train_prints_plan_note_resume_and_progress(tmp_path):
    recipe = merge(TINY_RECIPE, {"name": "talk", "output_dir": str(tmp_path / "runs"), "scaling": {"num_workers": 2},
                                 "train": {"steps": 4, "checkpoint_every": 2}})
    first = _train(recipe, tmp_path)
    out = first.stdout.splitlines()
    assert any(line.startswith("workers        1 x CPU") for line in out), first.stdout
    assert "note: scaling.num_workers (2) applies to `beitdist launch`; this `beitdist train` runs 1 rank" in first.stdout
    assert "resuming" not in first.stdout
    assert "step 4/4 loss" in first.stderr  # the progress line, printed at the end on a non-terminal
    again = _train(merge(recipe, {"train": {"steps": 6}}), tmp_path)
    assert f"resuming talk from step 4 ({tmp_path / 'runs' / 'talk' / 'checkpoints' / 'step_4'})" in again.stdout
