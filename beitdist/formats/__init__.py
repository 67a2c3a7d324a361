"""Whole models in foreign checkpoint formats (transformers, unilm / timm / mmseg).

The backbone's part is `beitdist.backbone.convert`, which knows no head; the head's part is asked
of the head class (`Head.hf_keys`, `unilm_keys`, `hf_architecture`, `options_from_state_dict`,
`options_from_hf`, `hf_config`). A foreign checkpoint's head is found by the keys the registered
heads declare, so a third-party head converts exactly like a built-in one.
"""

from beitdist.formats.reading import LoadedCheckpoint, read_foreign
from beitdist.formats.recognise import exportable_heads, recognise
from beitdist.formats.transformers import hf_head_key, transformers_config

__all__ = ["LoadedCheckpoint", "exportable_heads", "hf_head_key", "read_foreign", "recognise", "transformers_config"]
