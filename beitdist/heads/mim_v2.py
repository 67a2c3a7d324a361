"""BEiT v2's pretraining head (arXiv 2208.06366, section 2.3): masked image modeling plus the
patch-aggregation objective.

The MIM branch is v1's: the final tokens -> norm -> `lm_head`, cross-entropy on the masked patches.
The aggregation branch makes the CLS token carry the whole image: the CLS token of the LAST block
is put before the patch tokens of an EARLY block (`early_layers`, 9 of 12 for BEiT-B, 21 of 24 for
BEiT-L), a shallow stack of `head_layers` transformer blocks runs on them, and the same norm and
`lm_head` (shared, as in the paper) predict the masked patches' tokens again. The patch tokens
entering that stack are only 'early' ones, so the only way to predict well is through the CLS
token. The loss is the sum of both cross-entropies. Fine-tuning drops the stack; only the backbone
is kept.

Names follow unilm's beit2 pretraining model (`cls_pt_layers`, `lm_head`, its final `norm`; with
an unshared head `cls_pt_norm`, `cls_pt_lm_head`), so its pretraining checkpoints load as they are.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from beitdist.backbone.config import BackboneConfig
from beitdist.backbone.layers import Block, TruncNormalLinear
from beitdist.data.needs import DataNeeds
from beitdist.heads.base import BackboneStates, Head, HeadOutput
from beitdist.heads.keymap import KeyMap
from beitdist.hookspecs import hookimpl
from beitdist.schema import check

if TYPE_CHECKING:
    from beitdist.model import ModelOutput


@dataclass(frozen=True)
class MimV2Options:
    vocab_size: int = 8192
    """Visual-token vocabulary (BEiT v2's VQ-KD codebook has 8192 codes)."""
    early_layers: int | None = None
    """The block (1-based) whose patch tokens the aggregation stack reads; default depth - 3
    (unilm: 9 for BEiT-B, 21 for BEiT-L)."""
    head_layers: int = 2
    """Blocks in the aggregation stack."""
    shared_lm_head: bool = True
    """Both branches share the norm and `lm_head` (the paper); False gives the stack its own."""

    def __post_init__(self) -> None:
        check(self.vocab_size > 1, "vocab_size", f"expected an int > 1, got {self.vocab_size}")
        check(self.early_layers is None or self.early_layers >= 1, "early_layers",
              f"expected a block number >= 1, got {self.early_layers}")
        check(self.head_layers >= 1, "head_layers", f"expected >= 1, got {self.head_layers}")


class MimV2Head(Head):
    """See the module docstring. Logits follow `MimHead`'s convention (every patch in eval mode,
    the masked ones only in training mode); `aux_logits` are the aggregation branch's."""

    name = "mim_v2"
    Options = MimV2Options
    needs = "states"
    pooling = ("none",)
    uses_mask = True
    data_needs = DataNeeds(labels=None, mask=True, tokenizer=True)
    unilm_keys = KeyMap((("lm_head", "head.lm_head"), ("norm", "head.norm"), ("cls_pt_layers", "head.cls_pt_layers"),
                         ("cls_pt_norm", "head.cls_pt_norm"), ("cls_pt_lm_head", "head.cls_pt_lm_head")),
                        marks=("cls_pt_layers",))

    def __init__(self, backbone: BackboneConfig, options: MimV2Options | None = None) -> None:
        super().__init__(backbone, options)
        opts: MimV2Options = self.opts
        depth = backbone.depth
        self.early_layers = opts.early_layers if opts.early_layers is not None else max(depth - 3, 1)
        check(self.early_layers <= depth, "head.options.early_layers",
              f"block {self.early_layers} does not exist in a backbone of depth {depth}")
        dim, eps = backbone.embed_dim, backbone.layer_norm_eps
        total = max(depth, self.early_layers + opts.head_layers)
        rates = [backbone.drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        grid = backbone.grid_size if backbone.rel_pos_bias == "per_block" else None
        self.cls_pt_layers = nn.ModuleList(
            Block(dim, backbone.num_heads, backbone.hidden_mlp_dim, layer_id=self.early_layers + i + 1,
                  qkv_bias=backbone.qkv_bias, grid=grid, layer_scale_init=backbone.layer_scale_init,
                  drop_path=rates[self.early_layers + i], drop=backbone.drop_rate, attn_drop=backbone.attn_drop_rate,
                  act=backbone.act, eps=eps)
            for i in range(opts.head_layers))
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.lm_head = TruncNormalLinear(dim, opts.vocab_size)
        self.cls_pt_norm = None if opts.shared_lm_head else nn.LayerNorm(dim, eps=eps)
        self.cls_pt_lm_head = None if opts.shared_lm_head else TruncNormalLinear(dim, opts.vocab_size)

    def forward(self, features: BackboneStates, bool_masked_pos: torch.Tensor | None = None) -> HeadOutput:
        states = features.hidden_states  # embedding output, then each block's
        last, early = states[-1], states[self.early_layers]
        aggregated = torch.cat([last[:, :1], early[:, 1:]], dim=1)
        for block in self.cls_pt_layers:
            aggregated = block(aggregated, features.shared_bias)
        patches, aggregated = last[:, 1:], aggregated[:, 1:]
        if self.training and bool_masked_pos is not None and not torch.compiler.is_compiling():
            mask = bool_masked_pos.bool()
            patches, aggregated = patches[mask], aggregated[mask]
        logits = self.lm_head(self.norm(patches))
        if self.cls_pt_lm_head is not None and self.cls_pt_norm is not None:
            return HeadOutput(logits, self.cls_pt_lm_head(self.cls_pt_norm(aggregated)))
        return HeadOutput(logits, self.lm_head(self.norm(aggregated)))

    @staticmethod
    def _masked(logits: torch.Tensor, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return (logits if logits.dim() == 2 else logits[batch["bool_masked_pos"].bool()]).float()

    def loss(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        labels = batch["labels"][batch["bool_masked_pos"].bool()]
        assert output.aux_logits is not None  # forward always returns both branches
        if labels.numel() == 0:  # nothing masked in this batch: no signal, not NaN
            return (output.logits.sum() + output.aux_logits.sum()) * 0.0
        return (F.cross_entropy(self._masked(output.logits, batch), labels)
                + F.cross_entropy(self._masked(output.aux_logits, batch), labels))

    def metric_state(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["labels"][batch["bool_masked_pos"].bool()]
        assert output.aux_logits is not None
        return {
            "correct": self._masked(output.logits, batch).argmax(dim=-1).eq(labels).sum().double(),
            "correct_cls_pt": self._masked(output.aux_logits, batch).argmax(dim=-1).eq(labels).sum().double(),
            "count": torch.tensor(float(labels.numel()), dtype=torch.float64),
        }

    def compute_metrics(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        count = max(float(state["count"]), 1.0)
        return {"mim_accuracy": float(state["correct"]) / count,
                "cls_pt_accuracy": float(state["correct_cls_pt"]) / count}

    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        options: dict[str, Any] = {}
        weight = state_dict.get("head.lm_head.weight")
        if weight is not None:
            options["vocab_size"] = weight.shape[0]
        layers = {int(k.split(".")[2]) for k in state_dict if k.startswith("head.cls_pt_layers.")}
        if layers:
            options["head_layers"] = max(layers) + 1
        options["shared_lm_head"] = "head.cls_pt_lm_head.weight" not in state_dict
        return options


@hookimpl
def beitdist_register_heads(registry) -> None:
    registry.add(MimV2Head)
