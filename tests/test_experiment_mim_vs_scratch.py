"""Smoke run of experiments/mim_vs_scratch/run.py --v2: a few steps of every phase (k-means tokenizer,
MIM pretraining, fine-tuning from it and from scratch; v2's teacher, VQ-KD tokenizer and its export,
v2 pretraining and its fine-tune; the representation checks of both pretrainings), one seed, so the
experiment cannot rot."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("mlflow")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "experiments" / "mim_vs_scratch" / "run.py"


@pytest.mark.slow
def test_mim_vs_scratch_smoke(tmp_path: Path) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--v2", "--label-fractions", "0.1", "--out", str(out)],
                            capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"

    summary = json.loads((out / "results.json").read_text())
    rows = {row["arm"]: row for row in summary["rows"]}
    assert set(rows) == {"pretrained", "pretrained_v2", "scratch"}
    for row in rows.values():
        assert row["label_fraction"] == 0.1 and row["train_images"] == 143
        assert 0.0 <= row["val_top1_mean"] <= 1.0 and row["val_top1_std"] == 0.0  # one seed
        assert list(row["per_seed"]) == ["0"]
    for arm in rows:  # the validation curve of each arm, read back from MLflow
        steps = [step for step, _ in summary["curves"][f"{arm}_f0.1"]["0"]]
        assert steps == [2, 4]
        assert all(0.0 <= value <= 1.0 for _, value in summary["curves"][f"{arm}_f0.1"]["0"])
    for kind in ("pretrain", "pretrain_v2"):
        pretrain = summary["pretrain"][kind]["0"]
        assert 0.0 <= pretrain["val_mim_accuracy"] <= 1.0 and [s for s, _ in pretrain["curve"]] == [2, 4]
        prior = pretrain["position_prior"]  # the trivial MIM baseline, on the same masked patches
        assert 0.0 <= prior["val_mim_accuracy"] <= 1.0 and prior["val_loss"] > 0
        for check in ("knn", "linear_probe"):  # beitdist's representation checks, at every evaluation
            assert [s for s, _ in pretrain[check]] == [2, 4] and all(0.0 < v <= 1.0 for _, v in pretrain[check])
    assert 0.0 < summary["vqkd"]["val_codebook_usage"] <= 1.0 and "val_top1" in summary["teacher"]
    baselines = summary["representation_baselines"]  # what the k-NN / probe numbers are read against
    assert set(baselines) == {"random_init", "pixels", "teacher"}
    assert all(0.0 < v <= 1.0 for scores in baselines.values() for v in scores.values())
    assert baselines["pixels"]["knn_top1"] > 0.9  # digits: raw pixels are a strong k-NN baseline

    # each pretrained arm really started from its own pretraining's weights, the scratch arm from none;
    # v2 pretrained against the tokenizer exported from the VQ-KD run, which distilled the teacher
    logs = {arm: (out / "runs" / f"{arm}_f0.1_s0.log").read_text() for arm in rows}
    assert f"initialised weights from {out / 'runs' / 'pretrain_s0' / 'final'}" in logs["pretrained"]
    assert f"initialised weights from {out / 'runs' / 'pretrain_v2_s0' / 'final'}" in logs["pretrained_v2"]
    assert "initialised weights from" not in logs["scratch"]
    assert f"VQ-KD tokenizer {out / 'vqkd.safetensors'}" in (out / "runs" / "pretrain_v2_s0.log").read_text()
    vqkd = json.loads((out / "runs" / "vqkd" / "final" / "beitdist_config.json").read_text())
    assert vqkd["head_options"]["teacher"] == str(out / "runs" / "teacher" / "final")

    table = (out / "results.md").read_text()
    assert "| v1 (k-means) |" in table and "| v2 (VQ-KD) |" in table and "| scratch |" in table
    assert "10% (143)" in table and "from its grid position alone" in table and "k-NN top-1" in table
    png = out / "curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    logged = {p.name for p in (out / "mlartifacts").rglob("*") if p.is_file()}
    assert {"results.md", "results.json", "curves.png"} <= logged
