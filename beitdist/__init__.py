"""beitdist: train BEiT vision transformers at any scale.

Public API (stable): `load_model`, `export_hf`, `save_checkpoint`, `build_model`, `create_model`,
`list_models`, `ImageProcessor`, `BackboneConfig`, `variant`, `hookimpl`; `BeitForTask` also has
transformers' `from_pretrained` / `save_pretrained` and `forward(..., labels=)` -> `.loss`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from beitdist.backbone import BackboneConfig, Beit, variant
    from beitdist.backbone.convert import CheckpointError
    from beitdist.checkpoint import export_hf, load_model, save_checkpoint
    from beitdist.data.processor import ImageProcessor
    from beitdist.heads.base import Head, HeadOutput
    from beitdist.hookspecs import hookimpl
    from beitdist.model import BeitForTask, ModelOutput, build_model
    from beitdist.model_names import create_model, list_models

# The public names are imported on first use (PEP 562): `import beitdist.<module>` must not pull
# in torch (seconds) where only a light module is needed, e.g. the Ray worker set-up hook that
# runs in every Ray process of a launch, most of which never train.
_PUBLIC = {
    "BackboneConfig": "beitdist.backbone", "Beit": "beitdist.backbone", "variant": "beitdist.backbone",
    "CheckpointError": "beitdist.backbone.convert",
    "export_hf": "beitdist.checkpoint", "load_model": "beitdist.checkpoint", "save_checkpoint": "beitdist.checkpoint",
    "ImageProcessor": "beitdist.data.processor",
    "Head": "beitdist.heads.base", "HeadOutput": "beitdist.heads.base",
    "hookimpl": "beitdist.hookspecs",
    "BeitForTask": "beitdist.model", "ModelOutput": "beitdist.model", "build_model": "beitdist.model",
    "create_model": "beitdist.model_names", "list_models": "beitdist.model_names",
}


def __getattr__(name: str) -> Any:
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'beitdist' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


__version__ = "0.1.0"

__all__ = [
    "BackboneConfig",
    "Beit",
    "BeitForTask",
    "CheckpointError",
    "Head",
    "HeadOutput",
    "ImageProcessor",
    "ModelOutput",
    "build_model",
    "create_model",
    "export_hf",
    "hookimpl",
    "list_models",
    "load_model",
    "save_checkpoint",
    "variant",
]
