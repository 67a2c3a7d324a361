"""The head contract: what every head (built-in or third-party) declares and implements.

A head is an `nn.Module` subclass with these class attributes:

- `name`: the name recipes and `load_model(head=...)` use.
- `Options`: a dataclass, the schema of the head's recipe section (`head.options`); its
  `__post_init__` checks ranges with `beitdist.schema.check`, so bad values name their field.
- `needs`: what the model hands to `forward`: "pooled" (B, D), "tokens" (B, 1 + N, D) or
  "pyramid" (NCHW maps of the blocks at `self.block_indices`).
- `pooling`: backbone poolings it works with (the first is chosen when building), or None.
- `uses_mask`: True when it needs the backbone's mask token (masked image modeling).

and these methods:

- `__init__(backbone: BackboneConfig, options: Options)`.
- `forward(features, bool_masked_pos) -> Tensor | HeadOutput`.
- `loss(output, batch) -> Tensor`: a scalar from the model output and the batch dict.
- `metric_state(output, batch) -> dict[str, Tensor]`: SUMS over the batch (counts,
  intersections, ...) that can be all-reduced across ranks and accumulated over batches;
  `compute_metrics(state) -> dict[str, float]` turns the totals into the reported metrics.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from beitdist.backbone.config import BackboneConfig
from beitdist.schema import parse, plugin_class_problems, to_dict

if TYPE_CHECKING:
    from beitdist.model import ModelOutput

Needs = Literal["pyramid", "pooled", "tokens"]
NEEDS: tuple[str, ...] = ("pooled", "tokens", "pyramid")


@dataclass
class HeadOutput:
    """What a head with more than one output returns (segmentation: main and auxiliary logits)."""

    logits: torch.Tensor
    aux_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class NoOptions:
    """A head without options."""


class Head(nn.Module):
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    needs: ClassVar[Needs]
    pooling: ClassVar[tuple[str, ...] | None] = None
    uses_mask: ClassVar[bool] = False
    block_indices: tuple[int, ...] = ()
    """For `needs == "pyramid"`: the 0-based blocks whose outputs `forward` receives."""

    def __init__(self, backbone: BackboneConfig, options: Any = None) -> None:
        super().__init__()
        self.backbone_config = backbone
        self.opts = self.parse_options(options)

    @classmethod
    def parse_options(cls, options: Any, path: str = "head.options") -> Any:
        """The head's options from a recipe mapping (or an Options instance), validated."""
        return parse(cls.Options, options, path)

    def options(self) -> dict[str, Any]:
        """Plain options that rebuild this head (saved with checkpoints)."""
        return to_dict(self.opts)

    def forward(self, features: Any, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor | HeadOutput:
        raise NotImplementedError(f"head {type(self).__name__} must implement forward")

    def loss(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"head {type(self).__name__} must implement loss")

    def metric_state(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def compute_metrics(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {}


def contract_problems(cls: Any) -> list[str]:
    """What a class registered as a head lacks; empty when it honours the contract."""
    problems = plugin_class_problems(cls, Head, "beitdist.heads.Head", ("forward", "loss"))
    if problems and "is not a subclass" in problems[0]:
        return problems
    if getattr(cls, "needs", None) not in NEEDS:
        problems.insert(0, f"needs must be one of {', '.join(NEEDS)}, got {getattr(cls, 'needs', None)!r}")
    return problems
