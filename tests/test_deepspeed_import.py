"""beitdist.deepspeed_import: DeepSpeed is imported without the mlflow import its autotuner makes
on the side (seconds per rank), and mlflow still imports normally afterwards."""

from __future__ import annotations

import os
import subprocess
import sys


def _run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "DS_ACCELERATOR": "cpu"})
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


def test_deepspeed_comes_without_mlflow_and_mlflow_still_imports_after():
    out = _run("import sys; from beitdist.deepspeed_import import import_deepspeed; ds = import_deepspeed(); "
               "assert 'mlflow' not in sys.modules, 'mlflow imported'; "
               "assert import_deepspeed() is ds and ds.init_distributed; "
               "import mlflow; from mlflow import MlflowClient; print('ok', mlflow.__version__ > '')")
    assert out == "ok True"


def test_mlflow_imported_first_is_left_alone():
    out = _run("import sys, mlflow; from beitdist.deepspeed_import import import_deepspeed; import_deepspeed(); "
               "print(sys.modules['mlflow'] is mlflow)")
    assert out == "True"
