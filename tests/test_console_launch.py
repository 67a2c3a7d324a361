"""The console of the README's main job, as a new user sees it: `beitdist launch
recipes/quickstart.yaml` prints the plan, one progress line, a line per evaluation and per
checkpoint, and the result; no Ray report dicts, DeepSpeed build notes or duplicate notices. The
README's numbers are what the run gets, and `beitdist evaluate` reproduces them."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
pytestmark = pytest.mark.slow


def test_the_quickstart_console_is_short_and_says_what_happened(quickstart_launch):
    _, done = quickstart_launch
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    text = "\n".join(lines)
    for noise in ("Reporting training result", "TrainingReport(", "repeated", "built successfully",
                  "Processing zero checkpoint", "Started a local Ray instance", "Requesting resources",
                  "Setting up process group"):
        assert noise not in text, f"{noise!r} on the console:\n{text}"
    assert len(lines) < 30, f"{len(lines)} lines:\n{text}"
    evals = [line for line in lines if re.match(r"step \d+ eval: val_loss", line)]
    assert [int(line.split()[1]) for line in evals] == [175, 350, 525, 700]
    assert [line.split()[1] for line in lines if " checkpoint: " in line] == ["350", "700"]
    assert lines[0].startswith("run            quickstart")
    assert any(line.startswith("finished quickstart at step 700:") for line in lines)


def test_the_readme_quotes_what_the_quickstart_gets(quickstart_launch):
    run_dir, _ = quickstart_launch
    metrics = json.loads((run_dir / "train_result.json").read_text())["metrics"]
    quoted = re.search(r"reached \*\*([\d.]+)% validation top-1\*\*\s+\(val loss ([\d.]+)", README.read_text())
    assert quoted, "README no longer quotes the quickstart's top-1 and loss"
    assert quoted.group(1) == f"{metrics['val_top1'] * 100:.1f}" and quoted.group(2) == f"{metrics['val_loss']:.3f}"


def test_evaluate_reproduces_the_quickstart_runs_final_metrics(quickstart_launch, tmp_path):
    run_dir, _ = quickstart_launch
    done = subprocess.run([sys.executable, "-m", "beitdist", "evaluate", str(run_dir), "--out",
                           str(tmp_path / "eval.json")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = json.loads((run_dir / "train_result.json").read_text())["metrics"]
    assert json.loads((tmp_path / "eval.json").read_text())["metrics"] == expected
