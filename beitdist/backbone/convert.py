"""Foreign checkpoint layouts <-> beitdist's own keys, for the backbone; pure functions over state dicts.

beitdist's module keys are unilm's (and timm's) under `backbone.` plus the head's own under
`head.`, so those layouts only need unwrapping. transformers' on-disk layout (what
`save_pretrained` writes, in 4.x and 5.x alike) is mapped key by key, with q/k/v split from and
joined into unilm's single `qkv` weight (BEiT has no key bias).

This module knows no head: the mapping functions take a `head_key` callable for the head's keys,
which `beitdist.formats` takes from the head the checkpoint carries (its `KeyMap`s).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from beitdist.backbone.config import BackboneConfig, Pooling, RelPosBias
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
HeadKey = Callable[[str], "str | None"]
"""Maps a foreign key to the beitdist key of a head's weight, or None when it is not the head's
(the head's own `KeyMap.to_native`; `beitdist.formats` picks the head)."""


def unilm_key(key: str) -> str | None:
    """A unilm / timm / mmseg key without its wrapper prefixes (`backbone.`, `module.`,
    `encoder.`); None for the buffers beitdist recomputes (relative position index, zero k bias)."""
    if any(re.search(p, key) for p in _DROP_PATTERNS):
        return None
    key = key.removeprefix("backbone.")
    for prefix in _UNILM_PREFIXES:
        key = key.removeprefix(prefix)
    return key


def unilm_to_native(state_dict: Mapping[str, torch.Tensor], head_key: HeadKey | None = None) -> StateDict:
    """unilm / timm / mmseg keys -> `backbone.*`, and `head.*` for the keys `head_key` claims."""
    out: StateDict = {}
    for raw_key, value in state_dict.items():
        key = unilm_key(raw_key)
        if key is None:
            continue
        native = head_key(key) if head_key is not None else None
        out[native if native is not None else "backbone." + key] = value
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
HF_BACKBONE_PREFIX = "beit."
"""Where transformers' task models keep their BeitModel; their other keys are the head's."""
HF_MODEL_TYPES = {"beit": ("beit.", "Beit"), "data2vec-vision": ("data2vec_vision.", "Data2VecVision")}
"""transformers model types with BEiT's architecture: data2vec-vision (arXiv 2202.03555) is the same
encoder, with its task models keeping it under `data2vec_vision.` and classes named Data2VecVision*."""
DATA2VEC_PREFIX = HF_MODEL_TYPES["data2vec-vision"][0]


_DATA2VEC_HEAD_NAMES = (
    (r"\.psp_modules\.blocks\.(\d+)\.conv\.", r".psp_modules.\1.1.", r"\.psp_modules\.(\d+)\.1\.",
     r".psp_modules.blocks.\1.conv."),
    (r"\.psp_bottleneck\.", ".bottleneck.", r"\.bottleneck\.", ".psp_bottleneck."),
    (r"\.convolution\.", ".conv.", r"\.conv\.", ".convolution."),
    (r"\.normalization\.", ".bn.", r"\.bn\.", ".normalization."),
)
"""(Data2VecVision pattern, BEiT name, BEiT pattern, Data2VecVision name) of the UperNet head's
modules on disk: transformers saves BEiT's under mmseg's legacy names (`conv`, `bn`,
`psp_modules.N.1`, `bottleneck`) and Data2VecVision's under its module names."""


def _renamed_head_key(key: str, to_beit: bool) -> str:
    key = "." + key
    for d2v_pattern, beit_name, beit_pattern, d2v_name in _DATA2VEC_HEAD_NAMES[::1 if to_beit else -1]:
        key = re.sub(d2v_pattern, beit_name, key) if to_beit else re.sub(beit_pattern, d2v_name, key)
    return key[1:]


def as_beit_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """A Data2VecVision task model's keys as BEiT's on disk: the backbone under `beit.`, the head's
    modules under BEiT's names (a BEiT checkpoint comes back unchanged)."""
    if not any(k.startswith(DATA2VEC_PREFIX) for k in state_dict):
        return dict(state_dict)
    return {HF_BACKBONE_PREFIX + k[len(DATA2VEC_PREFIX):] if k.startswith(DATA2VEC_PREFIX)
            else _renamed_head_key(k, to_beit=True): v for k, v in state_dict.items()}


def as_data2vec_keys(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """BEiT task model keys on disk (`native_to_hf` with the `beit.` prefix) as Data2VecVision's."""
    return {DATA2VEC_PREFIX + k[len(HF_BACKBONE_PREFIX):] if k.startswith(HF_BACKBONE_PREFIX)
            else _renamed_head_key(k, to_beit=False): v for k, v in state_dict.items()}


def hf_architecture(beit_architecture: str, model_type: str) -> str:
    """transformers' class of a BEiT architecture under `model_type` (BeitForImageClassification ->
    Data2VecVisionForImageClassification)."""
    return HF_MODEL_TYPES[model_type][1] + beit_architecture.removeprefix("Beit")


def _map_prefix(key: str, table: Mapping[str, str]) -> str | None:
    for src in sorted(table, key=len, reverse=True):
        if key == src or key.startswith(src + "."):
            return table[src] + key[len(src):]
    return None


def hf_head_keys(state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys of a transformers task model outside its `beit.` backbone (none for a BeitModel)."""
    if not any(k.startswith(HF_BACKBONE_PREFIX) for k in state_dict):
        return []
    return [k for k in state_dict if not k.startswith(HF_BACKBONE_PREFIX)]


def hf_to_native(state_dict: Mapping[str, torch.Tensor], head_key: HeadKey | None = None) -> StateDict:
    """transformers on-disk keys (with or without the `beit.` prefix) -> beitdist keys; a task
    model's keys outside `beit.` are its head's: `head_key` maps them, else `head.<key>`."""
    out: StateDict = {}
    qkv: dict[int, dict[str, torch.Tensor]] = {}
    prefixed = any(k.startswith(HF_BACKBONE_PREFIX) for k in state_dict)
    for key, value in state_dict.items():
        if re.search(r"relative_position_index$", key):
            continue
        inner = key.removeprefix(HF_BACKBONE_PREFIX) if prefixed else key
        if prefixed and inner == key:  # head keys of the task models
            native = head_key(key) if head_key is not None else None
            out[native if native is not None else "head." + key] = value
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


def native_to_hf(state_dict: Mapping[str, torch.Tensor], prefix: str, head_key: HeadKey | None = None) -> StateDict:
    """beitdist keys -> transformers on-disk keys; `prefix` is "beit." for the task models, whose
    head keys `head_key` maps (else `head.<key>` becomes `<key>`)."""
    block_inverse = {v: k for k, v in _HF_BLOCK.items()}
    top_inverse = {v: k for k, v in _HF_TOP.items()}
    out: StateDict = {}
    for key, value in state_dict.items():
        if key.startswith("head."):
            foreign = head_key(key) if head_key is not None else None
            out[foreign if foreign is not None else key.removeprefix("head.")] = value
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
    rel: RelPosBias = "shared" if hf.get("use_shared_relative_position_bias") else (
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


def infer_pooling(state_dict: Mapping[str, torch.Tensor]) -> Pooling:
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
    rel: RelPosBias = "shared"
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


HF_BACKBONE_ARCHITECTURE = "BeitModel"


def backbone_to_hf_config(config: BackboneConfig, architecture: str = HF_BACKBONE_ARCHITECTURE,
                          model_type: str = "beit") -> dict[str, Any]:
    """config.json for transformers' BeitConfig (or Data2VecVisionConfig: the same fields)
    describing this backbone; a head adds its own entries and names its task model as
    `architecture`, a Beit* class name (see `beitdist.formats`)."""
    if config.image_size[0] != config.image_size[1]:
        raise CheckpointError(f"transformers' BEiT needs a square image_size, got {config.image_size}")
    hf: dict[str, Any] = {
        "model_type": model_type,
        "architectures": [hf_architecture(architecture, model_type)],
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
    return hf
