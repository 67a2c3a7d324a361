"""Visual tokenizers for masked-image-modeling targets, registered as plugins."""

from beitdist.tokenizers.base import Tokenizer

__all__ = ["Tokenizer"]
