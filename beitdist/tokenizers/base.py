"""The visual-tokenizer contract: images -> one discrete token id per backbone patch (MIM targets).

A tokenizer is an `nn.Module` subclass with class attributes `name` and `Options` (a dataclass,
the schema of the recipe's `tokenizer.options`), built as `Tokenizer(options)`. It exposes
`vocab_size` and `input_size` (the side in pixels of the view it reads, e.g. 112 for the DALL-E
dVAE) and implements `encode(images) -> LongTensor (B, h * w)`, taking RGB images in [0, 1] of
`input_size` pixels and returning token ids in row-major patch order, so that token i is the
target of backbone patch i. It never trains: `encode` runs under `torch.no_grad()`.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from beitdist.schema import parse, plugin_class_problems, to_dict


class Tokenizer(nn.Module):
    name: ClassVar[str]
    Options: ClassVar[type]
    vocab_size: int
    input_size: int

    def __init__(self, options: Any = None) -> None:
        super().__init__()
        self.opts: Any = parse(self.Options, options, "tokenizer.options")

    def options(self) -> dict[str, Any]:
        return to_dict(self.opts)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"tokenizer {type(self).__name__} must implement encode")


def contract_problems(cls: Any) -> list[str]:
    """What a class registered as a tokenizer lacks; empty when it honours the contract."""
    return plugin_class_problems(cls, Tokenizer, "beitdist.tokenizers.Tokenizer", ("encode",))
