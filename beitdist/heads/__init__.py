"""Heads: the `Head` contract and the built-in heads (registered through the plugin hook)."""

from beitdist.heads.base import Head, HeadOutput

__all__ = ["Head", "HeadOutput"]
