"""Writing a model in transformers' layout: config.json entries and head key names come from the
head (`hf_architecture`, `hf_config()`, `hf_keys`), the backbone's from `beitdist.backbone.convert`."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from beitdist.backbone.config import BackboneConfig
from beitdist.backbone.convert import CheckpointError, HeadKey, backbone_to_hf_config
from beitdist.formats.recognise import exportable_heads

if TYPE_CHECKING:
    from beitdist.heads.base import Head


def transformers_config(config: BackboneConfig, head: Head | None) -> dict[str, Any]:
    """config.json of transformers' BeitModel (no head) or of the head's task model; a head without
    a transformers equivalent is refused, naming the heads that have one."""
    if head is None:
        return backbone_to_hf_config(config)
    if head.hf_architecture is None:
        raise CheckpointError(f"head {head.name!r} has no transformers equivalent; exportable: "
                              f"{', '.join(exportable_heads())}")
    return {**backbone_to_hf_config(config, head.hf_architecture), **head.hf_config()}


def hf_head_key(head: Head | None) -> HeadKey | None:
    """beitdist head key -> transformers key, from the head's `hf_keys` (None: `head.` stripped)."""
    return head.hf_keys.to_foreign if head is not None and head.hf_keys is not None else None
