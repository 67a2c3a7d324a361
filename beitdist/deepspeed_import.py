"""Import DeepSpeed without the MLflow import its autotuner makes on the side.

Why: `import deepspeed` imports `deepspeed.autotuning` (its runtime config needs the autotuning
config), whose autotuner imports mlflow when it is installed, only to log autotuning
experiments that beitdist never runs. That is 2.3 of DeepSpeed's 2.8 s of import time on a 2-core
machine, paid by every rank of every launch, before the first step (rank 0 imports mlflow for its
own tracking on a background thread, off the training loop). While DeepSpeed is imported, mlflow
is marked absent (`sys.modules["mlflow"] = None`: DeepSpeed catches the ImportError and sets
`has_mlflow = False`); the mark is removed right after, so a later `import mlflow` works. The
trainer imports DeepSpeed during set-up, before any callback starts a thread; another thread that
imports mlflow during that second would get an ImportError.
"""

from __future__ import annotations

import sys
import threading
from types import ModuleType

_lock = threading.Lock()


def import_deepspeed() -> ModuleType:
    """`deepspeed`, imported once per process (see the module docstring); later calls are free."""
    with _lock:  # the check too: another thread's import in progress leaves a half-made module there
        if "deepspeed" in sys.modules:
            return sys.modules["deepspeed"]
        hide = "mlflow" not in sys.modules  # already imported: nothing to save, nothing to hide
        if hide:
            sys.modules["mlflow"] = None  # type: ignore[assignment]
        try:
            import deepspeed
        finally:
            if hide and sys.modules.get("mlflow", 0) is None:
                del sys.modules["mlflow"]
    return deepspeed
