"""The head contract: what a head needs from the backbone and how it turns features into logits.

A head is an `nn.Module` subclass with three class attributes:

- `name`: the name recipes and `load_model(head=...)` use.
- `needs`: what the model wrapper hands to `forward`: "pooled" (B, D), "tokens" (B, 1 + N, D)
  or "pyramid" (a list of NCHW maps from the blocks at `self.block_indices`).
- `pooling`: the backbone pooling the head requires, or None if it does not care.

Its constructor takes the backbone config and the head's own keyword options.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
from torch import nn

from beitdist.backbone.config import BackboneConfig

Needs = Literal["pooled", "tokens", "pyramid"]


class Head(nn.Module):
    name: ClassVar[str]
    needs: ClassVar[Needs]
    pooling: ClassVar[tuple[str, ...] | None] = None
    """Backbone poolings this head works with (the first is the default); None: any."""
    uses_mask: ClassVar[bool] = False
    """True when the head needs the backbone's mask token (masked image modeling)."""

    def __init__(self, backbone: BackboneConfig, **options: Any) -> None:
        super().__init__()
        self.backbone_config = backbone

    def options(self) -> dict[str, Any]:
        """The keyword options that rebuild this head (saved with checkpoints)."""
        return {}

    def forward(self, features: Any, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError(f"head {type(self).__name__} does not define forward")
