"""benchmarks/zero_scaling.py end to end, in miniature: BEiT-tiny at 32 px under ZeRO-3 on 1 and 2
torchrun workers (stages 0-2 use the same machinery; four runs would take twice as long), no
baseline runs. Every row must have a positive per-rank training peak, planner prediction and step
time, finite losses for every step, and the 1-worker row a scaling efficiency of exactly 1."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "zero_scaling.py"
STEPS = 3


def test_zero_scaling_benchmark_measures_every_run(tmp_path):
    results = tmp_path / "zero_scaling.json"
    cmd = [sys.executable, str(SCRIPT), "--variant", "tiny", "--image-size", "32", "--stages", "3", "--workers", "1",
           "2", "--steps", str(STEPS), "--batch", "2", "--no-baseline", "--out", str(tmp_path / "runs"), "--json",
           str(results)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "img/s tot" in done.stdout and "scaling" in done.stdout

    result = json.loads(results.read_text())
    rows = result["rows"]
    assert [(r["workers"], r["stage"]) for r in rows] == [(1, 3), (2, 3)]
    for r in rows:
        where = f"workers {r['workers']}, stage {r['stage']}: see {r['log']}"
        assert len(r["ranks"]) == r["workers"], where
        assert all(rank["train_peak"] > 0 and rank["run_peak"] >= rank["train_peak"] for rank in r["ranks"]), where
        assert r["peak"] > 0 and r["planned"] > 0 and r["ratio"] > 0, where
        assert r["step_time"] > 0 and r["images_per_s"] > 0, where
        assert {t["step"] for t in r["step_times"]} >= set(range(2, STEPS + 1)), where
        assert len(r["losses"]) == STEPS and r["losses_finite"], where
        assert not r["checkpoint_problems"], where
    assert rows[0]["efficiency"] == pytest.approx(1.0)
    assert rows[1]["efficiency"] > 0
    # the planner shards ZeRO-3's model states over the workers
    assert rows[1]["plan"]["model_states"] < rows[0]["plan"]["model_states"]
