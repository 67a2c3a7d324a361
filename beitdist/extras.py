"""Optional dependencies: which `pip install "beitdist[...]"` extra brings each one.

`pip install beitdist` is the core (torch, numpy, scipy, safetensors, pillow, pluggy, pyyaml):
the backbone, heads, `load_model`, `convert`/`export`, `ImageProcessor`, single-process
inference. Training and launching need the `train` extra. Every import of these packages is
lazy, so the core never imports them; a command that reaches one that is missing ends with one
line naming the extra (`beitdist.cli` turns the ModuleNotFoundError into it).
"""

from __future__ import annotations

import importlib.util

from beitdist.errors import InputError

EXTRA_OF: dict[str, tuple[str, str]] = {
    # top-level module -> (extra, what it is)
    "deepspeed": ("train", "DeepSpeed"),
    "ray": ("train", "Ray"),
    "mlflow": ("train", "MLflow"),
    "sklearn": ("train", "scikit-learn (the digits demo data)"),
    "fairscale": ("fairscale", "fairscale"),
    "transformers": ("hf", "transformers"),
    "onnx": ("onnx", "onnx"),
    "onnxruntime": ("onnx", "onnxruntime"),
    "onnxscript": ("onnx", "onnxscript"),
}


class MissingExtraError(InputError):
    """A command needs an optional dependency that is not installed."""


def missing_extra(err: ModuleNotFoundError, command: str) -> MissingExtraError | None:
    """The one-line error for a missing optional dependency, or None when `err` is about a module
    no extra provides (a real bug: a missing core dependency or a typo)."""
    root = (err.name or "").split(".")[0]
    if root not in EXTRA_OF:
        return None
    extra, what = EXTRA_OF[root]
    return MissingExtraError(f"{command} needs {what}, which is not installed: pip install \"beitdist[{extra}]\"")


def require(module: str, command: str) -> None:
    """Fail early, before any work, when `command` will need `module` and it is missing."""
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a finder that knows it is absent
        found = False
    if not found:
        raise missing_extra(ModuleNotFoundError(name=module), command) or ModuleNotFoundError(name=module)
