"""Import DeepSpeed without the MLflow and inductor imports it makes on the side.

Why: `import deepspeed` imports `deepspeed.autotuning` (its runtime config needs the autotuning
config), whose autotuner imports mlflow when it is installed, only to log autotuning
experiments that beitdist never runs. That is 2.3 of DeepSpeed's 2.8 s of import time on a 2-core
machine, paid by every rank of every launch, before the first step (rank 0 imports mlflow for its
own tracking on a background thread, off the training loop). While DeepSpeed is imported, mlflow
is marked absent (`sys.modules["mlflow"] = None`: DeepSpeed catches the ImportError and sets
`has_mlflow = False`); the mark is removed right after, so a later `import mlflow` works. The
trainer imports DeepSpeed during set-up, before any callback starts a thread; another thread that
imports mlflow during that second would get an ImportError.

Why the Muon module too: under ZeRO 1-3, DeepSpeed 0.19 imports its Muon optimizer on every rank
(to ask whether the client optimizer is one), and that module decorates three functions with
`torch.compile` at import. Decorating imports inductor, its code generator and their dependencies
(networkx, jinja2, ~590 modules): 1.8 s per rank here, for an optimizer beitdist never builds. The
module cannot be hidden like mlflow (ZeRO-2's gradient reduction imports it again, with no
fallback), so it is imported once, right after DeepSpeed, with DeepSpeed's `compile()` decorator
made lazy: each function is compiled on its first call, as `torch.compile` would on the first call
anyway, and never compiled when never called.
"""

from __future__ import annotations

import functools
import importlib
import sys
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch

_lock = threading.Lock()
_MUON = "deepspeed.runtime.zero.muon.original_muon"


def import_deepspeed() -> ModuleType:
    """`deepspeed`, imported once per process, and its Muon module with kernels compiled on first
    use, also when the caller imported DeepSpeed first (see the module docstring); later calls
    are free."""
    with _lock:  # the check too: another thread's import in progress leaves a half-made module there
        module: Any = sys.modules.get("deepspeed")
        if module is None:
            hide = "mlflow" not in sys.modules  # already imported: nothing to save, nothing to hide
            if hide:
                sys.modules["mlflow"] = None  # type: ignore[assignment]
            try:
                import deepspeed

                module = deepspeed
            finally:
                if hide and sys.modules.get("mlflow", 0) is None:
                    del sys.modules["mlflow"]
        if _MUON not in sys.modules:  # also when the caller imported DeepSpeed itself, before beitdist
            _import_muon_compiling_lazily()
    return module


def compile_on_first_call(fn: Callable[..., Any]) -> Callable[..., Any]:
    """`torch.compile(fn)`, made when the result is first called instead of now (see above)."""
    compiled: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn)
        return compiled(*args, **kwargs)

    return call


def _import_muon_compiling_lazily() -> None:
    try:
        from deepspeed.runtime import compiler
    except ImportError:  # a DeepSpeed without it: nothing decorates at import
        return
    eager = compiler.compile
    compiler.compile = lambda: compile_on_first_call
    try:
        importlib.import_module(_MUON)
    except ImportError:  # a DeepSpeed without Muon (before 0.17), or one that moved it
        pass
    finally:
        compiler.compile = eager
