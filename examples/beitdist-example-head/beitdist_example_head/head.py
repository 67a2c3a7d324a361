"""`linear_probe`: BEiT's linear evaluation (unilm `beit/run_linear_eval.py`) as a beitdist head.

What unilm does: run the frozen backbone, take the output of every block (no final norm), build
one feature per block from the CLS token and the mean of the patch tokens, and train one
independent `nn.Linear` per block (weights ~ N(0, 0.01), zero bias; no BatchNorm), summing their
cross-entropy losses. Accuracy is reported per block and the best block is the result (the
BEiT paper's linear-probing number comes from an intermediate block).

How this head maps that onto beitdist:

- `needs = "pyramid"`: the model hands the head the NCHW maps of the blocks in
  `self.block_indices`, computed once per forward pass (blocks after the deepest one are not
  run). Averaging a map over H and W is exactly unilm's mean of the patch tokens.
- The CLS token is NOT available: beitdist's pyramid maps carry patch tokens only, and
  `needs = "tokens"` hands over the last block alone. So the feature per block is the patch mean
  only (`Options.use_cls` exists to say so and accepts only False).
- `pooling = ("none",)`: the backbone is built without its final norm and pooler, which this
  head never reads (unilm probes the raw block outputs too).
- `forward` returns logits of shape (B, K, num_classes), K = len(block_indices), `[:, k]`
  from the classifier of block `block_indices[k]`.
- Freezing: linear probing trains this head only. The recipe says so, not the head:
  `model: {freeze: [backbone]}` keeps every backbone parameter out of the optimizer (no
  gradient, no optimizer state, no weight decay), under every ZeRO stage.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

import beitdist
from beitdist.schema import OptionsError, check

if TYPE_CHECKING:
    from beitdist import BackboneConfig, ModelOutput


@dataclass(frozen=True)
class LinearProbeOptions:
    num_classes: int = 1000
    block_indices: tuple[int, ...] | None = None
    """0-based blocks to probe (negative values count from the end); None: every block, as unilm."""
    use_cls: bool = False
    """unilm concatenates the CLS token to the patch mean. beitdist's "pyramid" maps carry no CLS
    token, so only False is accepted (the feature is the patch mean alone)."""
    batch_norm: bool = False
    """BatchNorm1d(affine=False, eps=1e-6) in front of each classifier, as MAE's linear probe
    (per process, not synchronised across ranks); not part of unilm's BEiT linear evaluation, hence
    off by default."""
    init_std: float = 0.01
    """Std of the classifiers' normal init (unilm: 0.01); biases start at zero."""

    def __post_init__(self) -> None:
        check(self.num_classes > 0, "num_classes", f"expected a positive int, got {self.num_classes}")
        if self.block_indices is not None:
            check(len(self.block_indices) > 0, "block_indices", "expected at least one block, or null for every block")
        check(
            not self.use_cls,
            "use_cls",
            'the CLS token is not available to a "pyramid" head (beitdist hands it patch maps only); '
            "the probe uses the mean of the patch tokens",
        )
        check(self.init_std >= 0.0, "init_std", f"expected >= 0, got {self.init_std}")


def resolve_blocks(indices: tuple[int, ...] | None, depth: int) -> tuple[int, ...]:
    """0-based, non-negative block indices for a backbone of `depth` blocks (None: all of them)."""
    if indices is None:
        return tuple(range(depth))
    path = "head.options.block_indices"
    for index in indices:
        if not -depth <= index < depth:
            raise OptionsError(path, f"block {index} is out of range for a backbone of depth {depth}")
    resolved = tuple(index % depth for index in indices)
    if len(set(resolved)) != len(resolved):
        raise OptionsError(path, f"{list(indices)} names the same block twice (depth {depth})")
    return resolved


class LinearProbeHead(beitdist.Head):
    """One linear classifier per probed block on the mean of its patch tokens (see the module doc)."""

    name = "linear_probe"
    Options = LinearProbeOptions
    needs = "pyramid"
    pooling = ("none",)

    def __init__(self, backbone: BackboneConfig, options: LinearProbeOptions | None = None) -> None:
        super().__init__(backbone, options)
        self.block_indices = resolve_blocks(self.opts.block_indices, backbone.depth)
        dim, blocks = backbone.embed_dim, len(self.block_indices)
        norm = (lambda: nn.BatchNorm1d(dim, eps=1e-6, affine=False)) if self.opts.batch_norm else nn.Identity
        self.norms = nn.ModuleList(norm() for _ in range(blocks))
        self.classifiers = nn.ModuleList(nn.Linear(dim, self.opts.num_classes) for _ in range(blocks))
        for linear in self.classifiers:
            nn.init.normal_(linear.weight, std=self.opts.init_std)
            nn.init.zeros_(linear.bias)

    def forward(self, features: list[torch.Tensor], bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        logits = [
            classifier(norm(fmap.mean(dim=(2, 3))))  # (B, D, H, W) -> mean of the patch tokens
            for fmap, norm, classifier in zip(features, self.norms, self.classifiers)
        ]
        return torch.stack(logits, dim=1)

    def loss(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The sum over probed blocks of each classifier's cross-entropy (unilm trains them jointly)."""
        logits, labels = output.logits.float(), batch["labels"]
        return sum(F.cross_entropy(logits[:, k], labels) for k in range(logits.shape[1]))

    def metric_state(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        if labels.is_floating_point():  # soft targets
            labels = labels.argmax(dim=-1)
        hits = output.logits.argmax(dim=-1).eq(labels.unsqueeze(-1)).sum(dim=0).double()
        state = {f"correct_top1_block{block}": hits[k] for k, block in enumerate(self.block_indices)}
        state["count"] = torch.tensor(float(labels.numel()), dtype=torch.float64)
        return state

    def compute_metrics(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """`top1_blockN` per probed block, and `top1`: the best of them (what unilm reports)."""
        count = max(float(state["count"]), 1.0)
        per_block = {f"top1_block{b}": float(state[f"correct_top1_block{b}"]) / count for b in self.block_indices}
        return {"top1": max(per_block.values()), **per_block}


@beitdist.hookimpl
def beitdist_register_heads(registry) -> None:
    registry.add(LinearProbeHead)
