"""Nothing a user types loses data: `export` / `convert` / `tokenizer fit` / `save_checkpoint` /
`export_hf` refuse an output that would replace something other than a checkpoint of the same
kind (and that one only with --overwrite), before any work, leaving the file system unchanged."""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import beitdist
from beitdist.cli import main
from beitdist.output_paths import OutputError


def _model():
    config = beitdist.BackboneConfig(embed_dim=32, depth=2, num_heads=4, image_size=32, patch_size=8)
    return beitdist.build_model(config, "classification", {"num_classes": 3}).eval()


def _tree(root: Path) -> dict[str, str]:
    """Every path under root with the hash of its content (directories as 'dir')."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = str(path.relative_to(root))
        out[rel] = "dir" if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _fake_run(runs: Path, name: str) -> Path:
    """A run directory as training leaves it (final weights, a checkpoint folder, MLflow store)."""
    run = runs / name
    beitdist.save_checkpoint(_model(), run / "final")
    (run / "checkpoints" / "step_10").mkdir(parents=True)
    (run / "checkpoints" / "step_10" / "shard.pt").write_bytes(b"shard")
    (run / "mlflow.db").write_bytes(b"sqlite")
    (run / "train_result.json").write_text("{}")
    return run


def _refused(capsys, argv: list[str], root: Path, message: str) -> None:
    before = _tree(root)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message in err[0]
    assert _tree(root) == before


def test_export_of_a_run_onto_itself_is_refused_and_nothing_is_deleted(tmp_path, capsys):
    run = _fake_run(tmp_path / "runs", "a")
    _refused(capsys, ["export", str(run), str(run)], tmp_path, "is the source")
    _refused(capsys, ["export", str(run), str(run / "final")], tmp_path, "is the source")
    _refused(capsys, ["export", str(run), str(run / "final"), "--overwrite"], tmp_path, "is the source")


def test_export_into_the_folder_of_all_runs_is_refused(tmp_path, capsys):
    run = _fake_run(tmp_path / "runs", "a")
    _fake_run(tmp_path / "runs", "b")
    _refused(capsys, ["export", str(run), str(tmp_path / "runs")], tmp_path, "holds the source")
    _refused(capsys, ["export", str(run), str(tmp_path / "runs" / "b"), "--overwrite"], tmp_path,
             "is a training run directory")


def test_export_onto_a_file_or_a_foreign_directory_is_refused(tmp_path, capsys):
    run = _fake_run(tmp_path / "runs", "a")
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpeg")
    _refused(capsys, ["export", str(run), str(tmp_path / "notes.txt")], tmp_path, "is a file, not a directory")
    _refused(capsys, ["export", str(run), str(tmp_path / "photos"), "--overwrite"], tmp_path,
             "exists and is not a checkpoint (holds cat.jpg)")
    _refused(capsys, ["export", str(run), str(tmp_path / "photos" / "cat.jpg" / "x")], tmp_path,
             "its parent")


def test_a_checkpoint_of_the_same_kind_is_replaced_only_with_overwrite(tmp_path, capsys):
    model = _model()
    beitdist.save_checkpoint(model, tmp_path / "src")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    _refused(capsys, ["convert", str(tmp_path / "src"), str(tmp_path / "hf")], tmp_path, "pass --overwrite")
    _refused(capsys, ["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--to", "beitdist", "--overwrite"],
             tmp_path, "holds a transformers directory, not a beitdist checkpoint")
    assert main(["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["hf", "src"]  # no temp or backup left behind
    (tmp_path / "hf" / "README.md").write_text("model card")
    _refused(capsys, ["convert", str(tmp_path / "src"), str(tmp_path / "hf"), "--overwrite"], tmp_path,
             "other files (README.md)")


def test_an_empty_directory_is_a_valid_output(tmp_path):
    (tmp_path / "out").mkdir()
    beitdist.save_checkpoint(_model(), tmp_path / "out")
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_save_checkpoint_into_a_directory_with_other_files_deletes_nothing(tmp_path):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "data.csv").write_text("1,2,3")
    before = _tree(tmp_path)
    with pytest.raises(OutputError, match="not a checkpoint"):
        beitdist.save_checkpoint(_model(), tmp_path / "work")
    with pytest.raises(OutputError, match="not a checkpoint"):
        beitdist.save_checkpoint(_model(), tmp_path / "work", overwrite=True)
    with pytest.raises(OutputError, match="is a file"):
        beitdist.export_hf(_model(), tmp_path / "work" / "data.csv", overwrite=True)
    assert _tree(tmp_path) == before


def test_python_api_overwrites_only_when_asked(tmp_path):
    first, second = _model(), _model()
    beitdist.save_checkpoint(first, tmp_path / "ckpt")
    with pytest.raises(OutputError, match="overwrite=True"):
        beitdist.save_checkpoint(second, tmp_path / "ckpt")
    beitdist.save_checkpoint(second, tmp_path / "ckpt", overwrite=True)
    loaded = beitdist.load_model(tmp_path / "ckpt", head="auto")
    torch.testing.assert_close(loaded.state_dict(), second.state_dict())


def test_outputs_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        beitdist.save_checkpoint(_model(), tmp_path / "ckpt")
        beitdist.export_hf(_model(), tmp_path / "hf")
    finally:
        os.umask(old)
    for path in [tmp_path / "ckpt", tmp_path / "hf"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o755
        for f in path.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_tokenizer_fit_refuses_to_replace_a_file_that_is_not_a_codebook(tmp_path, capsys):
    (tmp_path / "weights.safetensors").write_bytes(b"precious")
    _refused(capsys, ["tokenizer", "fit", "--images", "digits", "--out", str(tmp_path / "weights.safetensors"),
                      "--vocab-size", "4", "--input-size", "16", "--patch-size", "8", "--iters", "1",
                      "--max-images", "20", "--overwrite"], tmp_path, "exists and is not a codebook")
    _refused(capsys, ["tokenizer", "fit", "--images", "digits", "--out", str(tmp_path),
                      "--vocab-size", "4"], tmp_path, "is a directory")
    argv = ["tokenizer", "fit", "--images", "digits", "--out", str(tmp_path / "cb.safetensors"), "--vocab-size", "4",
            "--input-size", "16", "--patch-size", "8", "--iters", "1", "--max-images", "20"]
    assert main(argv) == 0
    capsys.readouterr()
    _refused(capsys, argv, tmp_path, "pass --overwrite")
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["cb.safetensors", "weights.safetensors"]


def test_refusal_through_the_installed_command_is_one_line_exit_2(tmp_path):
    run = _fake_run(tmp_path / "runs", "a")
    before = _tree(tmp_path)
    result = subprocess.run([sys.executable, "-m", "beitdist", "export", str(run), str(run)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"beitdist export: error: {run}: is the source {run} or inside it; write the output somewhere else"]
    assert _tree(tmp_path) == before


def test_a_runs_own_weights_are_never_replaced_from_outside(tmp_path, capsys):
    run = _fake_run(tmp_path / "runs", "a")
    beitdist.save_checkpoint(_model(), tmp_path / "src")
    _refused(capsys, ["convert", str(tmp_path / "src"), str(run / "final"), "--to", "beitdist", "--overwrite"],
             tmp_path, "belongs to the training run")
    with pytest.raises(OutputError, match="belongs to the training run"):
        beitdist.save_checkpoint(_model(), run / "final", overwrite=True)


def test_the_current_directory_as_output(tmp_path, monkeypatch):
    beitdist.save_checkpoint(_model(), tmp_path / "src")
    (tmp_path / "out").mkdir()
    monkeypatch.chdir(tmp_path / "out")
    assert main(["convert", str(tmp_path / "src"), ".", "--to", "beitdist"]) == 0
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_a_failed_swap_puts_the_old_checkpoint_back(tmp_path, monkeypatch):
    first = _model()
    beitdist.save_checkpoint(first, tmp_path / "ckpt")
    before = _tree(tmp_path)
    real_rename = Path.rename

    def flaky(self, target):
        if ".new-" in self.name:
            raise OSError("device busy")
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", flaky)
    with pytest.raises(OSError, match="device busy"):
        beitdist.save_checkpoint(_model(), tmp_path / "ckpt", overwrite=True)
    assert _tree(tmp_path) == before
