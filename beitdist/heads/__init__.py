"""Built-in heads. Each is an ordinary `Head` subclass; `head_class(name)` finds one by name."""

from __future__ import annotations

from beitdist.heads.base import Head
from beitdist.heads.classification import ClassificationHead
from beitdist.heads.mim import MimHead

BUILTIN_HEADS: dict[str, type[Head]] = {cls.name: cls for cls in (ClassificationHead, MimHead)}


class UnknownHeadError(ValueError):
    """A head name that no installed plugin provides."""


def head_class(name: str) -> type[Head]:
    try:
        return BUILTIN_HEADS[name]
    except KeyError:
        raise UnknownHeadError(f"unknown head {name!r}; available: {', '.join(sorted(BUILTIN_HEADS))}") from None


__all__ = ["BUILTIN_HEADS", "ClassificationHead", "Head", "MimHead", "UnknownHeadError", "head_class"]
