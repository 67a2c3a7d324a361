"""benchmarks/backbone_throughput.py and mim_pretrain_step.py in miniature (BEiT-tiny, one timed
step), and the GPU memory rows of benchmarks/zero_scaling.py: the benchmarks a lent GPU machine runs
(benchmarks/device_check.sh) must work before one is lent."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.slow
def test_backbone_benchmark_times_every_model(tmp_path):
    results = tmp_path / "backbone.json"
    cmd = [sys.executable, str(BENCHMARKS / "backbone_throughput.py"), "--device", "cpu", "--variants", "tiny",
           "--image-size", "32", "--dtypes", "fp32", "--iters", "1", "--json", str(results)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(results.read_text())
    assert result["device"].startswith("CPU") and result["matmul_precision"] == "highest"
    assert result["peaks_gflops"]["fp32"] > 0
    timed = [r for r in result["rows"] if r["images_per_s"]]
    assert {r["model"] for r in timed} >= {"beitdist", "transformers-sdpa", "transformers-eager"}
    assert {(r["mode"], r["dtype"]) for r in timed} == {("train", "fp32"), ("infer", "fp32")}
    for row in timed:
        assert row["gflops"] > 0 and 0 < row["peak_fraction"] and row["step_bytes"] is None, row
        assert 0.0 < row["matmul_share"] < 1.0 and row["device_busy"] is None, row
    for item in result["summary"]:
        assert item["ratio_vs_fastest_peer"] > 0 and item["fastest_peer"] != "beitdist"


@pytest.mark.slow
def test_mim_benchmark_times_both_models_on_the_same_loss(tmp_path):
    """benchmarks/mim_pretrain_step.py in miniature: beitdist (lm_head on the masked patches) and
    transformers (lm_head on every patch) compute the same first loss from the same weights."""
    results = tmp_path / "mim.json"
    cmd = [sys.executable, str(BENCHMARKS / "mim_pretrain_step.py"), "--device", "cpu", "--variant", "tiny",
           "--image-size", "64", "--iters", "1", "--drop-path", "0", "--check", "--json", str(results)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(results.read_text())
    assert [row["model"] for row in result["rows"]] == ["beitdist", "transformers-sdpa"]
    assert all(row["images_per_s"] > 0 for row in result["rows"]) and result["ratio"] > 0
    assert 0 < result["masked_patches_per_image"] < result["patches_per_image"] == 16
    losses = result["first_losses"]
    assert losses["beitdist"] == pytest.approx(losses["transformers-sdpa"], rel=1e-5)


def test_gpu_rows_come_from_the_trainers_record(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    from zero_scaling import device_rank_rows

    rows = device_rank_rows({"device_peak_bytes": [3 << 30, 2 << 30]})
    assert [(r["rank"], r["net"], r["baseline"]) for r in rows] == [(0, 3 << 30, 0), (1, 2 << 30, 0)]
    assert device_rank_rows({}) == []
