"""A foreign state dict (transformers, unilm / timm / mmseg) -> beitdist keys, backbone config,
head name and head options: backbone by `beitdist.backbone.convert`, head by the head the keys
identify (`beitdist.formats.recognise`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from beitdist.backbone.config import BackboneConfig, ConfigError
from beitdist.backbone.convert import (
    CheckpointError,
    StateDict,
    as_beit_keys,
    detect_layout,
    hf_config_to_backbone,
    hf_head_keys,
    hf_to_native,
    infer_backbone_config,
    unilm_key,
    unilm_to_native,
)
from beitdist.formats.native import is_native, recognise_native
from beitdist.formats.recognise import recognise


@dataclass
class LoadedCheckpoint:
    """A checkpoint mapped to beitdist keys, with what it says (or implies) about the model."""

    state_dict: StateDict
    config: BackboneConfig
    head: str | None
    head_options: dict[str, Any] = field(default_factory=dict)
    source: str = ""
    layout: str = ""


def read_foreign(raw: StateDict, hf_config: Mapping[str, Any] | None, where: str,
                 prefer: str | None = None) -> LoadedCheckpoint:
    """Map `raw` (unwrapped tensors) to beitdist keys; `hf_config` is transformers' config.json
    when it came with one. `prefer` (the head about to be built) settles ambiguous head keys."""
    if is_native(raw):
        native = infer_backbone_config(raw, where)
        name, options = recognise_native(raw, native, where, prefer)
        return LoadedCheckpoint(dict(raw), native, name, options, where, "beitdist")
    layout = detect_layout(raw)
    if layout == "hf":
        raw = as_beit_keys(raw)  # a Data2VecVision task model: the same encoder under another name
        head = recognise(hf_head_keys(raw), "hf", where, prefer)
        state = hf_to_native(raw, head.hf_keys.to_native if head is not None and head.hf_keys is not None else None)
        config: BackboneConfig | None
        try:
            config = hf_config_to_backbone(hf_config or {}, state) if hf_config is not None else None
        except ConfigError as err:
            raise CheckpointError(f"{where}: config.json does not describe a valid BEiT ({err})") from None
        if config is None:
            raise CheckpointError(f"{where}: transformers weights without their config.json")
    elif layout == "unilm":
        head = recognise(filter(None, map(unilm_key, raw)), "unilm", where, prefer)
        state = unilm_to_native(raw, head.unilm_keys.to_native if head is not None and head.unilm_keys is not None
                                else None)
        config = infer_backbone_config(state, where)
    else:
        raise CheckpointError(
            f"{where}: unknown checkpoint layout (first keys: {sorted(raw)[:5]}); supported: unilm/timm "
            "(.pth, blocks.N.*), transformers directories (config.json + weights), beitdist checkpoints"
        )
    if head is None:
        return LoadedCheckpoint(state, config, None, {}, where, layout)
    options = head.options_from_state_dict(state)
    if hf_config is not None:
        try:
            options.update(head.options_from_hf(hf_config, config))
        except CheckpointError as err:
            raise CheckpointError(f"{where}: {err}") from None
    return LoadedCheckpoint(state, config, head.name, options, where, layout)
