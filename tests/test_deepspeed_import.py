"""beitdist.engines.deepspeed.importing: DeepSpeed is imported without the mlflow import its
autotuner makes on the side (seconds per rank), and mlflow still imports normally afterwards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_deepspeed_comes_without_mlflow_and_mlflow_still_imports_after():
    out = _run("import sys; from beitdist.engines.deepspeed.importing import import_deepspeed; ds = import_deepspeed(); "
               "assert 'mlflow' not in sys.modules, 'mlflow imported'; "
               "assert import_deepspeed() is ds and ds.init_distributed; "
               "import mlflow; from mlflow import MlflowClient; print('ok', mlflow.__version__ > '')")
    assert out == "ok True"


def test_mlflow_imported_first_is_left_alone():
    out = _run("import sys, mlflow; from beitdist.engines.deepspeed.importing import import_deepspeed; import_deepspeed(); "
               "print(sys.modules['mlflow'] is mlflow)")
    assert out == "True"


@pytest.mark.parametrize("first", ["", "import deepspeed; "], ids=["beitdist-imports-deepspeed", "caller-did"])
def test_deepspeeds_muon_module_is_imported_without_compiling_anything(first):
    out = _run(f"import sys; {first}from beitdist.engines.deepspeed.importing import import_deepspeed; import_deepspeed(); "
               "from deepspeed.runtime import compiler; import torch; "
               "from deepspeed.runtime.zero.muon import original_muon; "
               "assert 'torch._inductor.compile_fx' not in sys.modules, 'inductor imported'; "
               "assert compiler.compile() is torch.compile, 'compile() left patched'; "
               "print(original_muon.muon_update.__name__)")
    assert out == "muon_update"


def test_compile_on_first_call_compiles_once_when_first_called(monkeypatch):
    import torch

    from beitdist.engines.deepspeed.importing import compile_on_first_call

    compiled_fns = []

    def fake_compile(fn):
        compiled_fns.append(fn)
        return lambda *args, **kwargs: ("compiled", fn(*args, **kwargs))

    monkeypatch.setattr(torch, "compile", fake_compile)

    def double(x, factor=2):
        return x * factor

    lazy = compile_on_first_call(double)
    assert compiled_fns == [] and lazy.__name__ == "double"
    assert lazy(3) == ("compiled", 6)
    assert lazy(3, factor=5) == ("compiled", 15)
    assert compiled_fns == [double]
