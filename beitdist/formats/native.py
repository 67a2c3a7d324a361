"""A plain `torch.save(model.state_dict())` of a beitdist model: beitdist's own keys
(`backbone.*`, `head.*`) without the config a beitdist checkpoint directory carries.

The backbone's config is read off the shapes (as for unilm files); the head is the registered head
whose module, built with the options its own `options_from_state_dict` reads off the file, has
exactly the file's `head.*` keys and shapes. So built-in heads and plugin heads that implement
`options_from_state_dict` are recognised alike, and a file whose head fits none is said to hold
one, never loaded as a bare backbone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from beitdist.backbone.config import BackboneConfig
from beitdist.backbone.convert import CheckpointError, StateDict

BACKBONE, HEAD = "backbone.", "head."


def is_native(state: Mapping[str, torch.Tensor]) -> bool:
    """beitdist's module keys: everything under `backbone.` or `head.`, with BEiT blocks in the
    backbone (mmseg files also use `backbone.`, but hold `decode_head.*`, not `head.*`)."""
    keys = list(state)
    return (bool(keys) and all(k.startswith((BACKBONE, HEAD)) for k in keys)
            and any(k.startswith(("backbone.blocks.", "backbone.patch_embed.")) for k in keys))


def _head_shapes(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in state.items() if k.startswith(HEAD)}


def _fits(head_cls: Any, config: BackboneConfig, state: StateDict, wanted: dict[str, tuple[int, ...]]
          ) -> dict[str, Any] | None:
    """The options under which `head_cls` has exactly the file's head tensors, or None."""
    from beitdist.model import build_model

    try:
        options = dict(head_cls.options_from_state_dict(state))
        with torch.device("meta"):
            model = build_model(config, head_cls.name, options)
    except Exception:  # noqa: BLE001 - a head that cannot be built from these shapes is not the file's
        return None
    built = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith(HEAD)}
    return options if built == wanted else None


def recognise_native(state: StateDict, config: BackboneConfig, where: str, prefer: str | None = None
                     ) -> tuple[str | None, dict[str, Any]]:
    """(head name, options) of the head whose weights `state` holds; (None, {}) without head keys.
    `prefer` is the head the caller will build ("auto": the file's own). Raises CheckpointError
    when head weights fit several heads and `prefer` does not settle it, or, for "auto", none."""
    from beitdist.plugins import get_registries

    wanted = _head_shapes(state)
    if not wanted:
        return None, {}
    found = []
    for entry in get_registries().heads:
        options = _fits(entry.obj, config, state, wanted)
        if options is not None:
            found.append((entry.name, options))
    if len(found) == 1:
        return found[0]
    for name, options in found:
        if name == prefer:
            return name, options
    if prefer != "auto":  # the caller builds a head of its choosing (or none): the file's is dropped, logged
        return None, {}
    if found:
        names = ", ".join(repr(name) for name, _ in found)
        raise CheckpointError(f"{where}: its head weights fit several heads ({names}); name the head to load "
                              "(load_model(head=...), --head)")
    raise CheckpointError(
        f"{where}: holds head weights ({', '.join(sorted(wanted)[:3])}, ...) that no installed head recognises; "
        "install the plugin whose head wrote them, or load the backbone alone with head=None (--head none)")
