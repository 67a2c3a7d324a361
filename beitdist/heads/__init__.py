"""Heads: the `Head` contract and the built-in heads (registered through the plugin hook)."""

from beitdist.data.needs import DataNeeds
from beitdist.heads.base import Head, HeadOutput
from beitdist.heads.keymap import KeyMap

DEFAULT_HEAD = "classification"
"""The head a recipe trains when its `head` section names none. Kept here, with the heads, because
no module outside `beitdist.heads` spells a head's name (tests/test_head_contract_layout.py)."""

__all__ = ["DEFAULT_HEAD", "DataNeeds", "Head", "HeadOutput", "KeyMap"]
