"""`model.freeze`: parameters a recipe keeps fixed (BEiT's linear probe: `freeze: [backbone]`).

Frozen parameters get `requires_grad=False` before the optimizer is built, so they are in no
optimizer group: no weight decay moves them, no optimizer state is allocated for them (also under
ZeRO-3, where DeepSpeed partitions only trainable parameters into its optimizer), and the memory
plan counts no gradient or optimizer bytes for them. Freezing inside a head or a callback after the
optimizer exists cannot give that: AdamW's decoupled weight decay still shrinks every parameter it
holds.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

from beitdist.errors import InputError

SHORTHANDS = {"backbone": "backbone.*", "head": "head.*"}
"""Whole parts of the model, by the prefix of their parameter names."""


def _glob(pattern: str) -> str:
    return SHORTHANDS.get(pattern, pattern)


def frozen_names(names: Sequence[str], patterns: Iterable[str]) -> list[str]:
    """The parameter names `patterns` select (fnmatch globs on names, or a shorthand of SHORTHANDS).
    Every pattern must select something, and something must be left to train."""
    names = list(names)
    selected: set[str] = set()
    for pattern in patterns:
        matched = fnmatch.filter(names, _glob(pattern))
        if not matched:
            close = difflib.get_close_matches(pattern, names, n=1)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise InputError(f"model.freeze: {pattern!r} matches no parameter; {hint}use 'backbone', 'head' or a "
                             f"glob on parameter names such as 'backbone.blocks.[0-5].*' (names look like "
                             f"{names[0]!r})")
        selected.update(matched)
    if names and len(selected) == len(names):
        raise InputError("model.freeze: every parameter would be frozen; nothing would train")
    return [n for n in names if n in selected]


def freeze(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Set requires_grad=False on the parameters `patterns` select; returns their names."""
    params = dict(model.named_parameters())
    names = frozen_names(list(params), patterns)
    for name in names:
        params[name].requires_grad_(False)
    return names
