"""The core install: without the `train` extra, loading, converting and exporting work and never
import DeepSpeed, Ray or MLflow; commands that need them exit 2 naming the extra. The missing
packages are simulated by an import hook in a fresh interpreter (a real `pip install .` venv would
download torch's dependencies on every run)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from beitdist import save_checkpoint
from beitdist.backbone.config import variant
from beitdist.model import build_model

OPTIONAL = ("deepspeed", "ray", "mlflow", "sklearn", "fairscale")

HARNESS = textwrap.dedent("""
    import importlib.abc, json, sys
    BLOCKED = {blocked!r}
    attempts = []
    class Missing(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                attempts.append(name)
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None
    sys.meta_path.insert(0, Missing())
    from beitdist.cli import main
    code = main({argv!r})
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("RESULT " + json.dumps({{"code": code, "attempts": attempts, "loaded": loaded}}))
""")


def _run_without(argv, cwd, blocked=OPTIONAL):
    out = subprocess.run([sys.executable, "-c", HARNESS.format(blocked=list(blocked), argv=list(argv))],
                         capture_output=True, text=True, cwd=cwd, timeout=300)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, out.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("RESULT ")), out


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    model = build_model(variant("tiny", image_size=32, depth=2), "classification", {"num_classes": 3})
    return save_checkpoint(model, tmp_path_factory.mktemp("core") / "ckpt")


@pytest.mark.parametrize("argv", [["convert", "{ckpt}", "{out}", "--to", "hf"],
                                  ["convert", "{ckpt}", "{out}", "--to", "beitdist", "--image-size", "64"],
                                  ["export", "{ckpt}", "{out}"]], ids=["convert-hf", "convert-resize", "export"])
def test_load_convert_export_never_import_the_training_stack(checkpoint, tmp_path, argv):
    argv = [a.format(ckpt=checkpoint, out=tmp_path / "out") for a in argv]
    result, out = _run_without(argv, tmp_path)
    assert result["code"] == 0, out.stderr[-3000:]
    assert result["attempts"] == [] and result["loaded"] == []
    assert (tmp_path / "out").is_dir()


def test_launch_without_the_train_extra_exits_2_naming_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'runs'}\ntracking: {{enabled: false}}\n"
                      "model: {backbone: {image_size: 32, depth: 2}}\nhead: {options: {num_classes: 10}}\n")
    result, out = _run_without(["launch", str(recipe)], tmp_path, blocked=("ray",))
    assert result["code"] == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1] == (
        'beitdist launch: error: beitdist launch needs Ray, which is not installed: pip install "beitdist[train]"')
    assert not (tmp_path / "runs").exists()


def test_tracking_without_mlflow_is_refused_before_training(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'runs'}\nmodel: {{backbone: {{image_size: 32, depth: 2}}}}\n"
                      "head: {options: {num_classes: 10}}\n")
    result, out = _run_without(["validate", str(recipe)], tmp_path, blocked=("mlflow",))
    assert result["code"] == 2, out.stderr[-3000:]
    assert 'needs MLflow, which is not installed: pip install "beitdist[train]"' in out.stderr
    assert "tracking.enabled" in out.stderr and "Traceback" not in out.stderr


def test_a_missing_core_module_is_still_a_bug_not_an_extra():
    from beitdist.extras import missing_extra

    assert missing_extra(ModuleNotFoundError(name="numpy"), "beitdist x") is None
    assert "beitdist[onnx]" in str(missing_extra(ModuleNotFoundError(name="onnxruntime.capi"), "beitdist export"))
    assert torch.__version__ >= "2.5"  # setup.cfg's lower bound: torch.serialization.safe_globals


@pytest.mark.slow
def test_a_fresh_venv_with_the_core_install_converts_and_exports_and_refuses_launch(tmp_path, checkpoint):
    """The real thing, once: `pip install .` (no extras) in a new virtual environment (about a
    minute: torch comes from the local wheel, the rest from the package index)."""
    import venv
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = str(env_dir / "bin" / "python")
    install = subprocess.run([python, "-m", "pip", "install", "--quiet", "-c", str(root / "constraints.txt"), str(root)],
                             capture_output=True, text=True, timeout=900)
    assert install.returncode == 0, install.stderr[-3000:]
    script = textwrap.dedent(f"""
        import json, sys
        from beitdist.cli import main
        codes = [main(["convert", {str(checkpoint)!r}, {str(tmp_path / "hf")!r}, "--to", "hf"]),
                 main(["export", {str(checkpoint)!r}, {str(tmp_path / "native")!r}, "--to", "beitdist"])]
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in {list(OPTIONAL)!r})
        print("RESULT " + json.dumps({{"codes": codes, "loaded": loaded}}))
    """)
    out = subprocess.run([python, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    result = json.loads(next(line for line in out.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert result == {"codes": [0, 0], "loaded": []}, out.stderr[-3000:]
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output_dir: {tmp_path / 'runs'}\ntracking: {{enabled: false}}\n")
    launch = subprocess.run([str(env_dir / "bin" / "beitdist"), "launch", str(recipe)], capture_output=True,
                            text=True, cwd=tmp_path, timeout=300)
    assert launch.returncode == 2
    assert launch.stderr.strip().endswith('pip install "beitdist[train]"'), launch.stderr[-2000:]
