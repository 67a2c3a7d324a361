"""beitdist: train BEiT vision transformers at any scale.

Public API (stable): `load_model`, `export_hf`, `save_checkpoint`, `build_model`, `ImageProcessor`,
`BackboneConfig`, `variant`, `hookimpl`.
"""

from beitdist.backbone import BackboneConfig, Beit, variant
from beitdist.backbone.convert import CheckpointError
from beitdist.checkpoint import export_hf, load_model, save_checkpoint
from beitdist.data.processor import ImageProcessor
from beitdist.heads.base import Head, HeadOutput
from beitdist.hookspecs import hookimpl
from beitdist.model import BeitForTask, ModelOutput, build_model

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
    "export_hf",
    "hookimpl",
    "load_model",
    "save_checkpoint",
    "variant",
]
