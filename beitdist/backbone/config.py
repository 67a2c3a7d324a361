"""BackboneConfig: every architectural option of the BEiT encoder, and the named variants.

The fields follow unilm's `VisionTransformer` arguments (and cover every option of transformers'
`BeitConfig` that changes the encoder), so a checkpoint from any of those sources maps onto one
config without loss. Values are checked at construction: a bad config fails here, with the field
named, rather than as a shape error deep inside `forward`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from beitdist.errors import InputError

RelPosBias = Literal["shared", "per_block", "none"]
Pooling = Literal["mean", "cls", "none"]

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")


class ConfigError(InputError):
    """A backbone config value is out of range; the message names the field and what is allowed."""


def _pair(value: int | tuple[int, int] | list[int], name: str) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ConfigError(f"backbone.{name}: expected an int or a pair of ints, got {value!r}")


@dataclass(frozen=True)
class BackboneConfig:
    """Architecture of a BEiT encoder. Defaults are BEiT-B/16 at 224 px as fine-tuned by unilm."""

    embed_dim: int = 768
    """Token width D."""
    depth: int = 12
    """Number of transformer blocks L."""
    num_heads: int = 12
    """Attention heads per block; D must divide evenly."""
    mlp_dim: int | None = None
    """Hidden width of the MLP; None means 4 * D (MLP ratio 4 in every released BEiT)."""
    image_size: tuple[int, int] = (224, 224)
    """Input (height, width) in pixels; fixes the patch grid and the relative-position tables."""
    patch_size: int = 16
    in_chans: int = 3
    qkv_bias: bool = True
    """Learned q and v biases (the key bias is always zero, as in BEiT)."""
    rel_pos_bias: RelPosBias = "per_block"
    """'shared': one table for all blocks (pretraining); 'per_block': one per block (fine-tuning)."""
    abs_pos_emb: bool = False
    """Absolute position embedding (off in the released BEiT models)."""
    layer_scale_init: float = 0.1
    """Initial value of gamma_1/gamma_2; 0 disables layer scale. 0.1 for B, 1e-5 for L."""
    drop_path_rate: float = 0.1
    """Stochastic depth rate of the last block; rates grow linearly from 0 over the blocks."""
    drop_rate: float = 0.0
    """Dropout after attention projection and MLP (0 in every BEiT recipe)."""
    attn_drop_rate: float = 0.0
    use_mask_token: bool = False
    """Learned mask token replacing masked patch embeddings (masked image modeling)."""
    pooling: Pooling = "mean"
    """'mean': mean of patch tokens -> fc_norm; 'cls': final norm -> CLS token; 'none': no pooled
    output and no final norm (MIM and segmentation models, whose heads bring their own norm)."""
    layer_norm_eps: float = 1e-6
    """1e-6 in unilm and timm; transformers' BeitConfig default is 1e-12."""
    act: str = "gelu"
    grad_checkpointing: bool = False
    """Recompute each block in backward to save activation memory."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", _pair(self.image_size, "image_size"))
        for name in ("embed_dim", "depth", "num_heads", "patch_size", "in_chans"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"backbone.{name}: expected a positive int, got {value!r}")
        if self.embed_dim % self.num_heads:
            raise ConfigError(
                f"backbone.num_heads: embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}"
            )
        if self.mlp_dim is not None and (not isinstance(self.mlp_dim, int) or self.mlp_dim <= 0):
            raise ConfigError(f"backbone.mlp_dim: expected a positive int or null, got {self.mlp_dim!r}")
        for axis, size in zip(("height", "width"), self.image_size):
            if size <= 0 or size % self.patch_size:
                raise ConfigError(
                    f"backbone.image_size: {axis} {size} must be a positive multiple of patch_size {self.patch_size}"
                )
        _check_choice("rel_pos_bias", self.rel_pos_bias, ("shared", "per_block", "none"))
        _check_choice("pooling", self.pooling, ("mean", "cls", "none"))
        _check_choice("act", self.act, ACTIVATIONS)
        for name in ("drop_path_rate", "drop_rate", "attn_drop_rate"):
            value = getattr(self, name)
            if not 0.0 <= float(value) < 1.0:
                raise ConfigError(f"backbone.{name}: expected a value in [0, 1), got {value!r}")
        if self.layer_scale_init < 0:
            raise ConfigError(f"backbone.layer_scale_init: expected >= 0, got {self.layer_scale_init!r}")
        if not self.layer_norm_eps > 0:
            raise ConfigError(f"backbone.layer_norm_eps: expected > 0, got {self.layer_norm_eps!r}")

    @property
    def grid_size(self) -> tuple[int, int]:
        """Patch grid (rows, cols)."""
        return (self.image_size[0] // self.patch_size, self.image_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    @property
    def hidden_mlp_dim(self) -> int:
        return self.mlp_dim if self.mlp_dim is not None else 4 * self.embed_dim

    def replace(self, **changes: Any) -> BackboneConfig:
        """A copy with some fields changed (validated again)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            allowed = ", ".join(f.name for f in dataclasses.fields(self))
            raise ConfigError(f"backbone: unknown field(s) {unknown}; allowed: {allowed}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["image_size"] = list(self.image_size)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneConfig:
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ConfigError(f"backbone: unknown field(s) {unknown}")
        return cls(**data)


RUNTIME_FLAGS = frozenset({"use_cache"})
"""Attributes transformers' Trainer sets on `model.config` (`model.config.use_cache = ...`); they
are not part of the architecture (not fields: not saved, compared or hashed)."""
_frozen_setattr = BackboneConfig.__setattr__


def _setattr(self: BackboneConfig, name: str, value: Any) -> None:
    if name in RUNTIME_FLAGS:
        object.__setattr__(self, name, value)
    else:
        _frozen_setattr(self, name, value)


BackboneConfig.__setattr__ = _setattr  # type: ignore[method-assign,assignment]
BackboneConfig.use_cache = False  # type: ignore[attr-defined]


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"backbone.{name}: got {value!r}; allowed: {', '.join(allowed)}")


VARIANTS: dict[str, dict[str, Any]] = {
    # Test and CPU-demo sizes (not released by unilm; same recipe, narrower and shallower).
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    # The published models (BEiT paper, Table 9).
    "base": dict(embed_dim=768, depth=12, num_heads=12, layer_scale_init=0.1),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, layer_scale_init=1e-5),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16, layer_scale_init=1e-5),
}


def variant(name: str, **overrides: Any) -> BackboneConfig:
    """The named variant's config with `overrides` applied, e.g. `variant("large", image_size=384)`."""
    if name not in VARIANTS:
        raise ConfigError(f"backbone.variant: unknown variant {name!r}; allowed: {', '.join(VARIANTS)}")
    return BackboneConfig(**{**VARIANTS[name], **overrides})


__all__ = ["BackboneConfig", "ConfigError", "VARIANTS", "variant"]
