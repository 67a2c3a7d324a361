"""`create_model("beit_base_patch16_224", ...)`: the model names timm users already type.

A name fixes the architecture (size, patch, resolution; `beitv2_` the BEiT v2 layer scale); the
head, its options and any backbone field are keyword overrides, as in `timm.create_model`.
`pretrained` is a local checkpoint path (anything `load_model` reads): beitdist has no hub, and
timm's pretrained tags (`.in22k_ft_in22k_in1k`) name downloads, so they are refused with a line
saying what to pass instead.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from dataclasses import dataclass
from typing import Any

from beitdist.backbone.config import VARIANTS, BackboneConfig, variant
from beitdist.errors import InputError
from beitdist.heads import DEFAULT_HEAD

log = logging.getLogger(__name__)

NAME = re.compile(r"(?P<family>beitv2|beit)_(?P<size>[a-z]+)_patch(?P<patch>\d+)_(?P<res>\d+)(?P<tag>\..*)?")
RESOLUTIONS = (224, 384, 512)
V2_LAYER_SCALE = 1e-5
"""BEiT v2 initialises layer scale at 1e-5 for every size (unilm beit2, timm's beitv2_*); v1 uses
0.1 for base."""
DEFAULT_CLASSES = 1000


class ModelNameError(InputError):
    """A model name `create_model` cannot build."""


@dataclass(frozen=True)
class ModelName:
    family: str
    size: str
    patch: int
    resolution: int

    def config(self, **overrides: Any) -> BackboneConfig:
        base: dict[str, Any] = {"patch_size": self.patch, "image_size": self.resolution}
        if self.family == "beitv2":
            base["layer_scale_init"] = V2_LAYER_SCALE
        return variant(self.size, **{**base, **overrides})


def parse_model_name(name: str) -> ModelName:
    match = NAME.fullmatch(name)
    if match is None:
        raise ModelNameError(f"model name {name!r}: expected beit_<size>_patch<P>_<resolution> (or beitv2_...), "
                             f"sizes {', '.join(VARIANTS)}, e.g. beit_base_patch16_224; see beitdist.list_models()")
    if match["tag"]:
        raise ModelNameError(f"model name {name!r}: {match['tag']!r} names timm's pretrained download; beitdist "
                             f"never downloads: pass the weights as pretrained=PATH (a local file or directory)")
    if match["size"] not in VARIANTS:
        raise ModelNameError(f"model name {name!r}: unknown size {match['size']!r}; allowed: {', '.join(VARIANTS)}")
    return ModelName(match["family"], match["size"], int(match["patch"]), int(match["res"]))


def list_models(pattern: str = "*") -> list[str]:
    """The canonical names (timm's spelling) matching a shell-style `pattern`; `create_model` also
    builds other patch sizes and resolutions of the same form."""
    names = [f"beit_{size}_patch16_{res}" for size in VARIANTS for res in RESOLUTIONS]
    names += [f"beitv2_{size}_patch16_224" for size in ("base", "large")]
    return sorted(n for n in names if fnmatch.fnmatchcase(n, pattern))


def create_model(name: str, pretrained: str | os.PathLike | None = None, *, num_classes: int | None = None,
                 head: str | None = DEFAULT_HEAD, head_options: dict[str, Any] | None = None,
                 **backbone_overrides: Any) -> Any:
    """A `BeitForTask` named like timm's models, freshly initialised or from `pretrained`.

    `num_classes` sets the classification head's classes (timm's meaning: 0 is no head, the
    bare backbone; default 1000 for a fresh model, the checkpoint's own for a pretrained one);
    `head`/`head_options` pick any registered head; other keywords are backbone fields
    (`drop_path_rate=0.2`, `grad_checkpointing=True`, ...). With `pretrained`, the checkpoint's
    architecture must be the named one (its resolution may differ: position tables are
    resampled to the name's); the result is in train mode, as timm returns it."""
    from beitdist.checkpoint import load_model
    from beitdist.model import build_model

    parsed = parse_model_name(name)
    options = dict(head_options or {})
    if num_classes == 0:
        head = None
    elif num_classes is not None:
        options["num_classes"] = num_classes
    target = parsed.config(**backbone_overrides)
    if pretrained is None:
        if head == DEFAULT_HEAD:
            options.setdefault("num_classes", DEFAULT_CLASSES)
        return build_model(target, head, options).train()
    model = load_model(pretrained, "auto" if head == DEFAULT_HEAD and not options else head, head_options=options,
                       image_size=target.image_size, **backbone_overrides)
    got = model.config
    expected = (target.embed_dim, target.depth, target.num_heads, target.patch_size)
    if (got.embed_dim, got.depth, got.num_heads, got.patch_size) != expected:
        raise ModelNameError(
            f"{pretrained}: holds a {got.depth}-block, {got.embed_dim}-wide model with {got.patch_size}-px patches, "
            f"not {name} ({target.depth} blocks, {target.embed_dim} wide, {target.patch_size}-px patches)")
    return model.train()


__all__ = ["ModelName", "ModelNameError", "create_model", "list_models", "parse_model_name"]
