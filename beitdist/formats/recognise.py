"""Which registered head a foreign checkpoint carries, from the key prefixes the heads declare.

Each head's `KeyMap` for a layout lists the foreign key prefixes that identify it (`marks`). The
registered heads are asked in turn; when the keys fit several (two plugins claiming the same
names), the head the caller asked for wins, and otherwise the checkpoint is refused with the
candidates named, rather than guessed.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Literal

from beitdist.backbone.convert import CheckpointError

if TYPE_CHECKING:
    from beitdist.heads.base import Head

Layout = Literal["hf", "unilm"]
_KEYMAP = {"hf": "hf_keys", "unilm": "unilm_keys"}


def recognise(keys: Iterable[str], layout: Layout, where: str, prefer: str | None = None) -> type[Head] | None:
    """The head class whose `hf_keys` / `unilm_keys` marks these foreign keys carry (None: no
    head's). `prefer` (the head the caller will build) settles a tie between several heads."""
    from beitdist.plugins import get_registries

    keys = list(keys)
    found = [entry for entry in get_registries().heads
             if (keymap := getattr(entry.obj, _KEYMAP[layout], None)) is not None and keymap.recognises(keys)]
    if len(found) <= 1:
        return found[0].obj if found else None
    for entry in found:
        if entry.name == prefer:
            return entry.obj
    names = ", ".join(f"{e.name!r} (plugin {e.plugin!r}, package {e.package})" for e in found)
    raise CheckpointError(f"{where}: its head weights fit several heads: {names}; name the head to load "
                          "(load_model(head=...), --head)")


def exportable_heads() -> list[str]:
    """Names of the registered heads with a transformers task model (`hf_architecture`)."""
    from beitdist.plugins import get_registries

    return [entry.name for entry in get_registries().heads if entry.obj.hf_architecture is not None]
