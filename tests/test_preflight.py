"""Mistakes caught before compute is spent: `validate`, `train` and `launch` refuse, in one stderr
line with exit 2 and nothing written, a recipe that is valid but cannot run here (labels beyond
the head's classes, an output_dir that cannot be written, a run name reused for another model,
fp16 on CPU workers, a misspelt tracking URI); an unreachable tracking server is one warning."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from beitdist import preflight as pf
from beitdist.cli import main
from beitdist.recipe_cli import validate_file
from tests.distributed import TINY_RECIPE, merge, run_recipe

COMMANDS = (["validate"], ["train"], ["launch"])


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*"))}


def _recipe(tmp_path: Path, name: str = "tiny", **changes) -> Path:
    recipe = merge(TINY_RECIPE, {"name": name, "output_dir": str(tmp_path / "runs"), **changes})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def _refused_everywhere(capsys, path: Path, root: Path, *messages: str) -> None:
    before = _tree(root)
    for command in COMMANDS:
        assert main([*command, str(path)]) == 2, command
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1, (command, err)
        for message in messages:
            assert message in err[0], (command, err[0])
        assert _tree(root) == before, command


def test_labels_beyond_the_heads_classes(tmp_path, capsys):
    path = _recipe(tmp_path, head={"name": "classification", "options": {"num_classes": 5}})
    _refused_everywhere(capsys, path, tmp_path, "head.options.num_classes: 5, but the dataset 'digits' has 10 classes "
                        "(labels 0..9); set head.options.num_classes: 10")


def test_labels_of_an_image_folder(tmp_path, capsys):
    for cls in ("cat", "dog"):
        (tmp_path / "pets" / "train" / cls).mkdir(parents=True)
    path = _recipe(tmp_path, head={"name": "classification", "options": {"num_classes": 2}},
                   data={"dataset": "image_folder", "options": {"root": str(tmp_path / "pets"), "val_split": None}})
    pf.check_labels(validate_file(path))  # as many classes as the head: fine
    path = _recipe(tmp_path, head={"name": "classification", "options": {"num_classes": 1}},
                   data={"dataset": "image_folder", "options": {"root": str(tmp_path / "pets"), "val_split": None}})
    _refused_everywhere(capsys, path, tmp_path, "'image_folder' has 2 classes")


def test_output_dir_that_is_a_file(tmp_path, capsys):
    (tmp_path / "runs").write_text("not a directory")
    path = _recipe(tmp_path)
    _refused_everywhere(capsys, path, tmp_path, f"output_dir: {tmp_path / 'runs'} is a file, not a directory")


@pytest.fixture
def read_only_dir(tmp_path):
    """A read-only file system (root ignores permission bits, so chmod would prove nothing)."""
    where = tmp_path / "ro"
    where.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(where)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (not root)")
    try:
        yield where
    finally:
        subprocess.run(["umount", str(where)], check=True)


def test_read_only_output_dir(tmp_path, capsys, read_only_dir):
    path = _recipe(tmp_path, output_dir=str(read_only_dir / "runs"))
    _refused_everywhere(capsys, path, tmp_path, f"output_dir: cannot write in {read_only_dir} (Read-only file system)")


def test_output_dir_without_room_for_a_checkpoint(tmp_path, monkeypatch):
    recipe = validate_file(_recipe(tmp_path))
    need = pf.checkpoint_disk_bytes(recipe)
    assert need > 0
    monkeypatch.setattr(pf.shutil, "disk_usage", lambda _: type("U", (), {"free": need - 1})())
    with pytest.raises(pf.PreflightError, match="one checkpoint of this model needs"):
        pf.check_run_dir_writable(recipe)


def test_fp16_on_cpu_workers(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    path = _recipe(tmp_path, engine={"zero_stage": 0, "precision": "fp16"})
    _refused_everywhere(capsys, path, tmp_path, "engine.precision: fp16 needs GPUs (DeepSpeed has no fp16 on CPU) and "
                        "this run's workers use CPUs (scaling.use_gpu: auto); use bf16 or fp32")


def test_misspelt_tracking_uri(tmp_path, capsys):
    path = _recipe(tmp_path, tracking={"enabled": True, "uri": "htp:/oops"})
    _refused_everywhere(capsys, path, tmp_path, "tracking.uri: unknown scheme 'htp' in 'htp:/oops'")


def test_unreachable_tracking_server_is_one_warning(tmp_path, caplog):
    from beitdist.distributed import free_port

    path = _recipe(tmp_path, tracking={"enabled": True, "uri": f"http://127.0.0.1:{free_port()}"})
    assert main(["validate", str(path)]) == 0
    assert main(["validate", str(path)]) == 0
    warnings = [r.getMessage() for r in caplog.records if r.name == "beitdist.preflight"]
    assert len(warnings) == 1 and "does not answer" in warnings[0]
    assert "the run will train but may log nothing" in warnings[0]


@pytest.mark.slow
def test_a_run_name_reused_for_another_model(tmp_path, capsys):
    recipe = merge(TINY_RECIPE, {"name": "reused", "train": {"steps": 2, "checkpoint_every": 2}})
    run_recipe(recipe, tmp_path, nproc=1)
    path = _recipe(tmp_path, "reused", model={"backbone": {"embed_dim": 48, "num_heads": 3}},
                   train={"steps": 2, "checkpoint_every": 2})
    _refused_everywhere(capsys, path, tmp_path, f"name: the run {tmp_path / 'runs' / 'reused'} was trained with another "
                        "model (backbone.", "is [", "use a new name (--set name=...) or output_dir")
    same = _recipe(tmp_path, "reused", train={"steps": 2, "checkpoint_every": 2})
    assert main(["validate", str(same)]) == 0  # the same model resumes


def test_refusal_through_the_command_line_is_one_line(tmp_path):
    path = _recipe(tmp_path, head={"name": "classification", "options": {"num_classes": 5}})
    result = subprocess.run([sys.executable, "-m", "beitdist", "train", str(path)], capture_output=True, text=True,
                            timeout=120, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "beitdist train: error: head.options.num_classes: 5, but the dataset 'digits' has 10 classes (labels 0..9); "
        "set head.options.num_classes: 10"]
    assert not (tmp_path / "runs").exists()


def test_freeze_patterns_must_select_parameters(tmp_path, capsys):
    path = _recipe(tmp_path, model={"freeze": ["backbone.blocks.9.*"]})
    _refused_everywhere(capsys, path, tmp_path, "model.freeze: 'backbone.blocks.9.*' matches no parameter")
    path = _recipe(tmp_path, model={"freeze": ["backbone", "head"]})
    _refused_everywhere(capsys, path, tmp_path, "model.freeze: every parameter would be frozen; nothing would train")
    assert main(["validate", str(_recipe(tmp_path, model={"freeze": ["backbone"]}))]) == 0


def test_a_misspelt_tracking_uri_in_the_environment_names_the_variable(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "htp:/oops")
    path = _recipe(tmp_path, tracking={"enabled": True})
    for command in (["train"], ["launch"]):
        assert main([*command, str(path)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "MLFLOW_TRACKING_URI (the environment, used as tracking.uri)" in err[0]
        assert "unknown scheme 'htp'" in err[0]
    assert not (tmp_path / "runs").exists()


def test_train_refuses_a_plan_that_does_not_fit_gpu_memory_gb(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("beitdist.distributed.uses_cuda", lambda: True)  # GPU workers, as launch would plan them
    path = _recipe(tmp_path, scaling={"gpu_memory_gb": 0.001})
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("beitdist train: error: scaling.gpu_memory_gb: the plan needs")
    assert not (tmp_path / "runs").exists()
