"""Writing a model in transformers' layout: config.json entries and head key names come from the
head (`hf_architecture`, `hf_config()`, `hf_keys`), the backbone's from `beitdist.backbone.convert`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from beitdist.backbone.config import BackboneConfig
from beitdist.backbone.convert import HF_MODEL_TYPES, CheckpointError, HeadKey, backbone_to_hf_config
from beitdist.formats.recognise import exportable_heads

if TYPE_CHECKING:
    from beitdist.heads.base import Head


DATA2VEC_ARCHITECTURES = frozenset({"BeitModel", "BeitForImageClassification", "BeitForSemanticSegmentation"})
"""The BEiT task models transformers also has as Data2VecVision* (it has no masked image modeling one)."""


def transformers_config(config: BackboneConfig, head: Head | None, model_type: str = "beit") -> dict[str, Any]:
    """config.json of transformers' BeitModel (no head) or of the head's task model, as `model_type`
    (beit or data2vec-vision); a head without a transformers equivalent is refused, naming the
    heads that have one."""
    if model_type not in HF_MODEL_TYPES:
        raise CheckpointError(f"model type {model_type!r}: allowed: {', '.join(HF_MODEL_TYPES)}")
    if head is None:
        return backbone_to_hf_config(config, model_type=model_type)
    if head.hf_architecture is None:
        raise CheckpointError(f"head {head.name!r} has no transformers equivalent; exportable: "
                              f"{', '.join(exportable_heads())}")
    if model_type == "data2vec-vision" and head.hf_architecture not in DATA2VEC_ARCHITECTURES:
        raise CheckpointError(f"head {head.name!r}: transformers has no Data2VecVision model for "
                              f"{head.hf_architecture}; export it as beit (--to hf), or a classification or "
                              "segmentation head as data2vec-vision")
    return {**backbone_to_hf_config(config, head.hf_architecture, model_type), **head.hf_config()}


def hf_head_key(head: Head | None) -> HeadKey | None:
    """beitdist head key -> transformers key, from the head's `hf_keys` (None: `head.` stripped)."""
    return head.hf_keys.to_foreign if head is not None and head.hf_keys is not None else None
