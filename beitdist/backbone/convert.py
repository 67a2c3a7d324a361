"""Foreign checkpoint layouts <-> beitdist's own keys; pure functions over state dicts.

beitdist's module keys are unilm's (and timm's) under `backbone.` plus the head's own under
`head.`, so those layouts only need unwrapping. transformers' on-disk layout (what
`save_pretrained` writes, in 4.x and 5.x alike) is mapped key by key, with q/k/v split from and
joined into unilm's single `qkv` weight (BEiT has no key bias).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from beitdist.backbone.config import BackboneConfig
from beitdist.backbone.resample import grid_from_table_rows
from beitdist.errors import InputError

StateDict = dict[str, torch.Tensor]


class CheckpointError(InputError):
    """A checkpoint that cannot be loaded as asked; the message names the file, keys and shapes."""


# ------------------------------------------------------------------ unwrapping
WRAPPER_KEYS = ("model", "state_dict", "module", "model_state")


def unwrap(obj: Any, where: str) -> StateDict:
    """The tensor dict inside unilm's {"model": ...}, mmseg's {"state_dict": ...} or DeepSpeed's
    {"module": ...} wrappers (or the dict itself)."""
    for _ in range(3):
        if isinstance(obj, Mapping) and not _is_state_dict(obj):
            inner = next((obj[k] for k in WRAPPER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                raise CheckpointError(
                    f"{where}: no state dict found; top-level keys {sorted(obj)[:10]} "
                    f"(expected tensors, or one of {list(WRAPPER_KEYS)} holding them)"
                )
            obj = inner
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        raise CheckpointError(f"{where}: not a state dict of tensors")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def _is_state_dict(obj: Mapping) -> bool:
    return bool(obj) and sum(isinstance(v, torch.Tensor) for v in obj.values()) >= max(1, len(obj) // 2)


# ------------------------------------------------------------- layout sniffing
def detect_layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    """'hf' (transformers on disk), 'unilm' (unilm / timm / beitdist module keys) or 'unknown'."""
    keys = list(state_dict)
    if any(re.search(r"(^|\.)encoder\.layer\.\d+\.", k) or "embeddings.patch_embeddings" in k for k in keys):
        return "hf"
    if any(re.match(r"^(backbone\.|module\.|encoder\.)?(blocks\.\d+\.|patch_embed\.)", k) for k in keys):
        return "unilm"
    return "unknown"


# ------------------------------------------------ unilm / timm -> beitdist
_UNILM_PREFIXES = ("module.", "encoder.")
_DROP_PATTERNS = (r"relative_position_index$", r"\.k_bias$")


def unilm_to_native(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """unilm / timm / mmseg keys -> `backbone.*` / `head.*`.

    The head a checkpoint carries is recognised by its keys: `head` (classification), `lm_head`
    with its `norm` (pretraining), `decode_head` / `auxiliary_head` / `fpn*` (mmseg ADE20K).
    """
    keys = list(state_dict)
    mim = any(k.endswith("lm_head.weight") for k in keys)
    out: StateDict = {}
    for key, value in state_dict.items():
        if any(re.search(p, key) for p in _DROP_PATTERNS):
            continue
        key = key.removeprefix("backbone.")
        for prefix in _UNILM_PREFIXES:
            key = key.removeprefix(prefix)
        if key.startswith(("decode_head.", "auxiliary_head.", "fpn1.", "fpn2.", "fpn3.", "fpn4.")):
            out["head." + re.sub(r"^(decode_head|auxiliary_head)\.conv_seg\.", r"\1.classifier.", key)] = value
        elif key.startswith("head."):
            out["head.classifier." + key.removeprefix("head.")] = value
        elif key.startswith("lm_head."):
            out["head." + key] = value
        elif mim and key.startswith("norm."):
            out["head." + key] = value
        else:
            out["backbone." + key] = value
    return out


# ---------------------------------------------------------- transformers <-> beitdist
_HF_BLOCK = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "lambda_1": "gamma_1",
    "lambda_2": "gamma_2",
    "attention.attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
}
_HF_TOP = {
    "embeddings.cls_token": "backbone.cls_token",
    "embeddings.mask_token": "backbone.mask_token",
    "embeddings.position_embeddings": "backbone.pos_embed",
    "embeddings.patch_embeddings.projection": "backbone.patch_embed.proj",
    "encoder.relative_position_bias.relative_position_bias_table": "backbone.rel_pos_bias.relative_position_bias_table",
    "layernorm": "backbone.norm",
    "pooler.layernorm": "backbone.fc_norm",
}
_HF_HEAD = {  # keys outside `beit.` in the task models
    "classifier": "head.classifier",
    "layernorm": "head.norm",
    "lm_head": "head.lm_head",
}


def _map_prefix(key: str, table: Mapping[str, str]) -> str | None:
    for src in sorted(table, key=len, reverse=True):
        if key == src or key.startswith(src + "."):
            return table[src] + key[len(src):]
    return None


def hf_to_native(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """transformers on-disk keys (with or without the `beit.` prefix) -> beitdist keys."""
    out: StateDict = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    prefixed = any(k.startswith("beit.") for k in state_dict)
    for key, value in state_dict.items():
        if re.search(r"relative_position_index$", key):
            continue
        inner = key.removeprefix("beit.") if prefixed else key
        if prefixed and inner == key:  # head keys of the task models
            out[_map_prefix(key, _HF_HEAD) or "head." + key] = value
            continue
        match = re.match(r"encoder\.layer\.(\d+)\.(.+)$", inner)
        if match:
            index, rest = int(match.group(1)), match.group(2)
            qkv_match = re.match(r"attention\.attention\.(query|key|value)\.(weight|bias)$", rest)
            if qkv_match:
                qkv.setdefault(index, {})[f"{qkv_match.group(1)}.{qkv_match.group(2)}"] = value
                continue
            mapped = _map_prefix(rest, _HF_BLOCK)
            if mapped is None:
                raise CheckpointError(f"unrecognised transformers key {key!r}")
            out[f"backbone.blocks.{index}.{mapped}"] = value
            continue
        mapped = _map_prefix(inner, _HF_TOP)
        if mapped is None:
            raise CheckpointError(f"unrecognised transformers key {key!r}")
        out[mapped] = value
    for index, parts in qkv.items():
        missing = [p for p in ("query.weight", "key.weight", "value.weight") if p not in parts]
        if missing:
            raise CheckpointError(f"layer {index}: missing attention weights {missing}")
        prefix = f"backbone.blocks.{index}.attn."
        out[prefix + "qkv.weight"] = torch.cat([parts["query.weight"], parts["key.weight"], parts["value.weight"]])
        if "query.bias" in parts:
            out[prefix + "q_bias"] = parts["query.bias"]
        if "value.bias" in parts:
            out[prefix + "v_bias"] = parts["value.bias"]
    return out


def native_to_hf(state_dict: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    """beitdist keys -> transformers on-disk keys; `prefix` is "beit." for the task models."""
    block_inverse = {v: k for k, v in _HF_BLOCK.items()}
    top_inverse = {v: k for k, v in _HF_TOP.items()}
    head_inverse = {v: k for k, v in _HF_HEAD.items()}
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith("head."):
            out[_map_prefix(key, head_inverse) or key.removeprefix("head.")] = value
            continue
        match = re.match(r"backbone\.blocks\.(\d+)\.(.+)$", key)
        if match:
            index, rest = match.group(1), match.group(2)
            base = f"{prefix}encoder.layer.{index}."
            if rest == "attn.qkv.weight":
                q, k, v = value.chunk(3)
                out[base + "attention.attention.query.weight"] = q
                out[base + "attention.attention.key.weight"] = k
                out[base + "attention.attention.value.weight"] = v
            elif rest == "attn.q_bias":
                out[base + "attention.attention.query.bias"] = value
            elif rest == "attn.v_bias":
                out[base + "attention.attention.value.bias"] = value
            else:
                mapped = _map_prefix(rest, block_inverse)
                if mapped is None:
                    raise CheckpointError(f"no transformers name for {key!r}")
                out[base + mapped] = value
            continue
        mapped = _map_prefix(key, top_inverse)
        if mapped is None:
            raise CheckpointError(f"no transformers name for {key!r}")
        out[prefix + mapped] = value
    return out


# ----------------------------------------------------------- config inference
_HF_ACT = {"gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "relu": "relu",
           "silu": "silu", "swish": "silu"}
_ACT_HF = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "relu": "relu", "silu": "silu"}


def hf_config_to_backbone(hf: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]) -> BackboneConfig:
    """transformers' config.json -> BackboneConfig; pooling is read from which norms are present."""
    if hf.get("use_relative_position_bias") and hf.get("use_shared_relative_position_bias"):
        raise CheckpointError("config.json asks for both shared and per-block relative position bias")
    rel = "shared" if hf.get("use_shared_relative_position_bias") else (
        "per_block" if hf.get("use_relative_position_bias") else "none")
    patch = hf.get("patch_size", 16)
    patch = patch[0] if isinstance(patch, (list, tuple)) else patch
    act = hf.get("hidden_act", "gelu")
    if act not in _HF_ACT:
        raise CheckpointError(f"config.json: hidden_act {act!r} not supported; allowed: {sorted(_HF_ACT)}")
    hidden = hf.get("hidden_size", 768)
    return BackboneConfig(
        embed_dim=hidden,
        depth=hf.get("num_hidden_layers", 12),
        num_heads=hf.get("num_attention_heads", 12),
        mlp_dim=hf.get("intermediate_size", 4 * hidden),
        image_size=hf.get("image_size", 224),
        patch_size=patch,
        in_chans=hf.get("num_channels", 3),
        qkv_bias=True,
        rel_pos_bias=rel,
        abs_pos_emb=bool(hf.get("use_absolute_position_embeddings", False)),
        layer_scale_init=float(hf.get("layer_scale_init_value", 0.1)),
        drop_path_rate=float(hf.get("drop_path_rate", 0.1)),
        drop_rate=float(hf.get("hidden_dropout_prob", 0.0)),
        attn_drop_rate=float(hf.get("attention_probs_dropout_prob", 0.0)),
        use_mask_token=bool(hf.get("use_mask_token", False)) or "backbone.mask_token" in state_dict,
        pooling=infer_pooling(state_dict),
        layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
        act=_HF_ACT[act],
    )


def infer_pooling(state_dict: Mapping[str, torch.Tensor]) -> str:
    if "backbone.fc_norm.weight" in state_dict:
        return "mean"
    if "backbone.norm.weight" in state_dict:
        return "cls"
    return "none"


def infer_backbone_config(state_dict: Mapping[str, torch.Tensor], where: str) -> BackboneConfig:
    """A BackboneConfig read off the shapes of a unilm / timm state dict (which carries no config).

    The head count comes from the relative-position table when there is one, else from BEiT's
    head width of 64; layer norm eps is unilm's 1e-6. Pass overrides to `load_model` otherwise.
    """
    try:
        proj = state_dict["backbone.patch_embed.proj.weight"]
        dim = state_dict["backbone.cls_token"].shape[-1]
    except KeyError as missing:
        raise CheckpointError(f"{where}: missing {missing.args[0]!r}; not a BEiT checkpoint") from None
    depth = 1 + max(int(m.group(1)) for k in state_dict if (m := re.match(r"backbone\.blocks\.(\d+)\.", k)))
    table = state_dict.get("backbone.rel_pos_bias.relative_position_bias_table")
    rel = "shared"
    if table is None:
        table = state_dict.get("backbone.blocks.0.attn.relative_position_bias_table")
        rel = "per_block" if table is not None else "none"
    patch = proj.shape[-1]
    pos = state_dict.get("backbone.pos_embed")
    if table is not None:
        grid = grid_from_table_rows(table.shape[0])
        heads = table.shape[1]
    elif pos is not None:
        side = round((pos.shape[1] - 1) ** 0.5)
        grid, heads = (side, side), max(1, dim // 64)
    else:
        grid, heads = (224 // patch, 224 // patch), max(1, dim // 64)
    gamma = state_dict.get("backbone.blocks.0.gamma_1")
    return BackboneConfig(
        embed_dim=dim,
        depth=depth,
        num_heads=heads,
        mlp_dim=state_dict["backbone.blocks.0.mlp.fc1.weight"].shape[0],
        image_size=(grid[0] * patch, grid[1] * patch),
        patch_size=patch,
        in_chans=proj.shape[1],
        qkv_bias="backbone.blocks.0.attn.q_bias" in state_dict,
        rel_pos_bias=rel,
        abs_pos_emb=pos is not None,
        layer_scale_init=float(gamma.float().mean()) if gamma is not None else 0.0,
        use_mask_token="backbone.mask_token" in state_dict,
        pooling=infer_pooling(state_dict),
    )


def infer_head(state_dict: Mapping[str, torch.Tensor]) -> tuple[str | None, dict[str, Any]]:
    """The head a native-keyed state dict carries, with the options its shapes imply."""
    if "head.classifier.weight" in state_dict:
        return "classification", {"num_classes": state_dict["head.classifier.weight"].shape[0]}
    if "head.lm_head.weight" in state_dict:
        return "mim", {"vocab_size": state_dict["head.lm_head.weight"].shape[0]}
    if any(k.startswith("head.decode_head.") for k in state_dict):
        return "segmentation", _segmentation_shapes(state_dict)
    return None, {}


def _segmentation_shapes(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
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
def hf_out_indices_to_blocks(out_indices: list[int], depth: int) -> tuple[int, ...]:
    blocks = []
    for i in out_indices:
        hidden = i - 1 if i - 1 >= 0 else i - 1 + depth + 1
        if not 0 <= hidden <= depth:
            raise CheckpointError(f"config.json: out_indices {out_indices} out of range for {depth} layers")
        if hidden == 0:
            raise CheckpointError(
                f"config.json: out_index {i} selects the patch embedding (transformers reads hidden_states[{i - 1}]); "
                "the segmentation head reads block outputs only")
        blocks.append(hidden - 1)
    return tuple(blocks)


def blocks_to_hf_out_indices(blocks: list[int], depth: int) -> list[int]:
    out = [0 if b % depth == depth - 1 else b % depth + 2 for b in blocks]
    if len(set(out)) != len(out) or out != sorted(out):
        raise CheckpointError(
            f"block_indices {list(blocks)} cannot be expressed in transformers: its out_index i reads "
            f"hidden_states[i - 1], so block b is out_index b + 2 and the last block only out_index 0, and "
            f"BeitConfig wants out_indices ascending and distinct (here {out}); unilm's defaults, which end at the "
            "last block, are such a case")
    return out


def hf_segmentation_options(hf: Mapping[str, Any], depth: int) -> dict[str, Any]:
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


HF_ARCHITECTURES = {
    None: "BeitModel",
    "classification": "BeitForImageClassification",
    "mim": "BeitForMaskedImageModeling",
    "segmentation": "BeitForSemanticSegmentation",
}


def backbone_to_hf_config(config: BackboneConfig, head: str | None, head_options: Mapping[str, Any]) -> dict:
    """config.json for transformers' BeitConfig describing this backbone and head."""
    if config.image_size[0] != config.image_size[1]:
        raise CheckpointError(f"transformers' BEiT needs a square image_size, got {config.image_size}")
    hf: dict[str, Any] = {
        "model_type": "beit",
        "architectures": [HF_ARCHITECTURES[head]],
        "hidden_size": config.embed_dim,
        "num_hidden_layers": config.depth,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.hidden_mlp_dim,
        "hidden_act": _ACT_HF[config.act],
        "hidden_dropout_prob": config.drop_rate,
        "attention_probs_dropout_prob": config.attn_drop_rate,
        "layer_norm_eps": config.layer_norm_eps,
        "image_size": config.image_size[0],
        "patch_size": config.patch_size,
        "num_channels": config.in_chans,
        "use_mask_token": config.use_mask_token,
        "use_absolute_position_embeddings": config.abs_pos_emb,
        "use_relative_position_bias": config.rel_pos_bias == "per_block",
        "use_shared_relative_position_bias": config.rel_pos_bias == "shared",
        "layer_scale_init_value": config.layer_scale_init,
        "drop_path_rate": config.drop_path_rate,
        "use_mean_pooling": config.pooling != "cls",
    }
    if head == "classification":
        num = int(head_options["num_classes"])
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(num)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(num)}
    elif head == "mim":
        hf["vocab_size"] = int(head_options["vocab_size"])
    elif head == "segmentation":
        if head_options["channels"] != config.embed_dim:
            raise CheckpointError(f"transformers' UperNet width is hidden_size {config.embed_dim}, "
                                  f"the head has channels {head_options['channels']}")
        num = int(head_options["num_classes"])
        hf["id2label"] = {str(i): f"LABEL_{i}" for i in range(num)}
        hf["label2id"] = {f"LABEL_{i}": i for i in range(num)}
        hf["out_indices"] = blocks_to_hf_out_indices(head_options["block_indices"], config.depth)
        hf["pool_scales"] = list(head_options["pool_scales"])
        hf["semantic_loss_ignore_index"] = head_options["ignore_index"]
        for key in ("use_auxiliary_head", "auxiliary_channels", "auxiliary_num_convs", "auxiliary_concat_input",
                    "auxiliary_loss_weight"):
            hf[key] = head_options[key]
    return hf
