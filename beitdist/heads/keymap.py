"""How a head names its weights in a foreign checkpoint layout (transformers, unilm / timm / mmseg).

A head declares one `KeyMap` per layout it can be converted from or to (`Head.hf_keys`,
`Head.unilm_keys`); `beitdist.formats` recognises the head of a foreign checkpoint by the `marks`
and maps the head's keys with the prefix pairs, while the backbone's keys are mapped by
`beitdist.backbone.convert`, which knows no head.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


def _matches(key: str, prefix: str) -> bool:
    return key == prefix or key.startswith(prefix + ".")


def _replace(key: str, pairs: Iterable[tuple[str, str]]) -> str | None:
    """`key` with the longest matching source prefix replaced by its target; None when none matches."""
    for source, target in sorted(pairs, key=lambda pair: len(pair[0]), reverse=True):
        if _matches(key, source):
            return target + key[len(source):]
    return None


@dataclass(frozen=True)
class KeyMap:
    """Prefix pairs (foreign key prefix, beitdist key prefix) for one layout.

    A prefix matches a key equal to it or followed by "."; the longest matching prefix wins, so
    ("decode_head.conv_seg", "head.decode_head.classifier") can refine ("decode_head", ...).
    """

    pairs: tuple[tuple[str, str], ...]
    marks: tuple[str, ...] | None = None
    """Foreign key prefixes whose presence in a checkpoint says it carries this head; None: every
    foreign prefix of `pairs`. A prefix that also names backbone weights in other checkpoints
    (unilm's final `norm`, which the MIM head owns) must be left out of the marks."""

    excludes: tuple[str, ...] = ()
    """Foreign key prefixes whose presence says the checkpoint is NOT this head's (v1 MIM's
    `lm_head` is also in BEiT v2's pretraining checkpoints, which `cls_pt_layers` tells apart)."""

    def __post_init__(self) -> None:
        for pair in self.pairs:
            if len(pair) != 2 or not all(isinstance(part, str) and part for part in pair):
                raise ValueError(f"KeyMap pairs are (foreign prefix, beitdist prefix) strings, got {pair!r}")
            if not pair[1].startswith("head."):
                raise ValueError(f"a head's weights are under 'head.', got the target {pair[1]!r}")

    def recognises(self, keys: Iterable[str]) -> bool:
        """Whether any of these foreign keys carries one of the marks."""
        keys = list(keys)
        if any(_matches(key, excluded) for key in keys for excluded in self.excludes):
            return False
        marks = self.marks if self.marks is not None else tuple(source for source, _ in self.pairs)
        return any(_matches(key, mark) for key in keys for mark in marks)

    def to_native(self, key: str) -> str | None:
        """The beitdist key of a foreign key, or None when no pair names it."""
        return _replace(key, self.pairs)

    def to_foreign(self, key: str) -> str | None:
        """The foreign key of a beitdist key, or None when no pair names it."""
        return _replace(key, [(target, source) for source, target in self.pairs])
