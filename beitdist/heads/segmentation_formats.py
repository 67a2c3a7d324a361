"""The segmentation head in foreign formats: transformers' `BeitForSemanticSegmentation` config
and unilm / mmseg / transformers key names, so `beitdist.formats` can convert it without knowing it.

transformers' `out_indices` count hidden states, unilm's count blocks; the translation and what
transformers cannot express (a UperNet width other than hidden_size, index orders) live here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from beitdist.backbone.convert import CheckpointError
from beitdist.heads.keymap import KeyMap

MODULES = ("decode_head", "auxiliary_head", "fpn1", "fpn2", "fpn3", "fpn4")
HF_KEYS = KeyMap(tuple((module, f"head.{module}") for module in MODULES))
"""transformers' module names are the head's own (mmseg's, with `conv_seg` called `classifier`)."""
UNILM_KEYS = KeyMap((
    ("decode_head.conv_seg", "head.decode_head.classifier"),
    ("auxiliary_head.conv_seg", "head.auxiliary_head.classifier"),
    *HF_KEYS.pairs,
))
"""mmseg's ADE20K checkpoints of unilm's BEiT: `fpn1`..`fpn4` under `backbone.`, classifiers `conv_seg`."""


def options_from_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Segmentation options the weights' shapes fix (classes, widths, auxiliary convs)."""
    classifier = state_dict.get("head.decode_head.classifier.weight")
    options: dict[str, Any] = {} if classifier is None else {
        "num_classes": classifier.shape[0], "channels": classifier.shape[1]}
    aux = state_dict.get("head.auxiliary_head.classifier.weight")
    options["use_auxiliary_head"] = aux is not None
    if aux is not None:
        options["auxiliary_channels"] = aux.shape[1]
        options["auxiliary_num_convs"] = sum(
            bool(re.match(r"head\.auxiliary_head\.convs\.\d+\.conv\.weight$", k)) for k in state_dict)
        options["auxiliary_concat_input"] = "head.auxiliary_head.conv_cat.conv.weight" in state_dict
    return options


# transformers' BeitForSemanticSegmentation feeds hidden_states[i - 1] for each out_index i, and
# hidden_states[0] is the patch embedding: i selects block i - 2 (0-based), i = 0 the last block,
# i = 1 the embedding. unilm's out_indices are the 0-based blocks themselves.
def hf_out_indices_to_blocks(out_indices: Sequence[int], depth: int) -> tuple[int, ...]:
    blocks = []
    for i in out_indices:
        hidden = i - 1 if i - 1 >= 0 else i - 1 + depth + 1
        if not 0 <= hidden <= depth:
            raise CheckpointError(f"config.json: out_indices {list(out_indices)} out of range for {depth} layers")
        if hidden == 0:
            raise CheckpointError(
                f"config.json: out_index {i} selects the patch embedding (transformers reads hidden_states[{i - 1}]); "
                "the segmentation head reads block outputs only")
        blocks.append(hidden - 1)
    return tuple(blocks)


def blocks_to_hf_out_indices(blocks: Sequence[int], depth: int) -> list[int]:
    out = [0 if b % depth == depth - 1 else b % depth + 2 for b in blocks]
    if len(set(out)) != len(out) or out != sorted(out):
        raise CheckpointError(
            f"block_indices {list(blocks)} cannot be expressed in transformers: its out_index i reads "
            f"hidden_states[i - 1], so block b is out_index b + 2 and the last block only out_index 0, and "
            f"BeitConfig wants out_indices ascending and distinct (here {out}); unilm's defaults, which end at the "
            "last block, are such a case")
    return out


def options_from_hf(hf: Mapping[str, Any], depth: int) -> dict[str, Any]:
    """Segmentation options from a transformers config.json (what the shapes cannot tell)."""
    out_indices = hf.get("out_indices") or hf.get("segmentation_indices")
    if out_indices is None and hf.get("out_features"):
        out_indices = [0 if f == "stem" else int(str(f).removeprefix("stage")) for f in hf["out_features"]]
    options: dict[str, Any] = {}
    if out_indices is not None:
        options["block_indices"] = hf_out_indices_to_blocks(list(out_indices), depth)
    for hf_key, key in (("pool_scales", "pool_scales"), ("auxiliary_loss_weight", "auxiliary_loss_weight"),
                        ("semantic_loss_ignore_index", "ignore_index")):
        if hf.get(hf_key) is not None:
            options[key] = tuple(hf[hf_key]) if key == "pool_scales" else hf[hf_key]
    return options


def hf_config(options: Mapping[str, Any], embed_dim: int, depth: int) -> dict[str, Any]:
    """config.json entries for the head's resolved options (`SegmentationHead.options()`)."""
    if options["channels"] != embed_dim:
        raise CheckpointError(f"transformers' UperNet width is hidden_size {embed_dim}, "
                              f"the head has channels {options['channels']}")
    num = int(options["num_classes"])
    hf: dict[str, Any] = {
        "id2label": {str(i): f"LABEL_{i}" for i in range(num)},
        "label2id": {f"LABEL_{i}": i for i in range(num)},
        "out_indices": blocks_to_hf_out_indices(options["block_indices"], depth),
        "pool_scales": list(options["pool_scales"]),
        "semantic_loss_ignore_index": options["ignore_index"],
    }
    for key in ("use_auxiliary_head", "auxiliary_channels", "auxiliary_num_convs", "auxiliary_concat_input",
                "auxiliary_loss_weight"):
        hf[key] = options[key]
    return hf
