"""Masked image modeling: LayerNorm -> Linear over the visual-token vocabulary; the loss is the
cross-entropy on masked patches only, as in BEiT's pretraining."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from beitdist.backbone.config import BackboneConfig
from beitdist.backbone.layers import TruncNormalLinear
from beitdist.data.needs import DataNeeds
from beitdist.heads.base import Head
from beitdist.heads.keymap import KeyMap
from beitdist.hookspecs import hookimpl
from beitdist.schema import check

if TYPE_CHECKING:
    from beitdist.model import ModelOutput


@dataclass(frozen=True)
class MimOptions:
    vocab_size: int = 8192
    """Visual-token vocabulary (the DALL-E dVAE's is 8192)."""

    def __post_init__(self) -> None:
        check(self.vocab_size > 1, "vocab_size", f"expected an int > 1, got {self.vocab_size}")


class MimHead(Head):
    """Predicts visual tokens. unilm's pretraining model keeps its final norm next to `lm_head`;
    here that norm is `head.norm`, and the backbone runs with pooling 'none' (no norm of its own),
    which is the same computation.

    The logits' shape follows the module's mode:

    - eval mode (inference, evaluation, and models from `load_model`): every patch, (B, N, vocab),
      as transformers' `BeitForMaskedImageModeling` returns them;
    - training mode with a mask: the masked patches only, (M, vocab) in `x[bool_masked_pos]`
      order, as unilm's pretraining model computes them by default (`return_all_tokens=False`),
      because the loss reads nothing else. BEiT-B masks ~75 of 196 patches, so the norm and the
      768 x 8192 projection run on 40% of the rows (a BEiT-B pretraining step 6% faster on a CPU,
      and 60% of the logits' memory saved);
    - training under `torch.compile`: every patch again, since selecting the masked rows has a
      data-dependent shape that would split the compiled graph at the head and recompile it when
      the number of masked patches changes.
    """

    name = "mim"
    Options = MimOptions
    needs = "tokens"
    pooling = ("none", "cls")
    uses_mask = True
    data_needs = DataNeeds(labels=None, mask=True, tokenizer=True)
    hf_architecture = "BeitForMaskedImageModeling"
    hf_keys = KeyMap((("layernorm", "head.norm"), ("lm_head", "head.lm_head")))
    hf_pooler = False
    # unilm's pretraining model keeps its final `norm` next to `lm_head` (see above); `norm` alone
    # is the backbone's final norm in other checkpoints, so only `lm_head` identifies this head
    unilm_keys = KeyMap((("lm_head", "head.lm_head"), ("norm", "head.norm")), marks=("lm_head",),
                        excludes=("cls_pt_layers",))  # BEiT v2's pretraining head: `mim_v2`

    def __init__(self, backbone: BackboneConfig, options: MimOptions | None = None) -> None:
        super().__init__(backbone, options)
        self.norm = nn.LayerNorm(backbone.embed_dim, eps=backbone.layer_norm_eps)
        self.lm_head = TruncNormalLinear(backbone.embed_dim, self.opts.vocab_size)

    def forward(self, features: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        patches = features[:, 1:]
        if self.training and bool_masked_pos is not None and not torch.compiler.is_compiling():
            patches = patches[bool_masked_pos.bool()]
        return self.lm_head(self.norm(patches))

    @staticmethod
    def _masked(output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and target tokens of the masked patches, from either shape `forward` returns."""
        mask = batch["bool_masked_pos"].bool()
        logits = output.logits if output.logits.dim() == 2 else output.logits[mask]
        return logits.float(), batch["labels"][mask]

    def loss(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits, labels = self._masked(output, batch)
        if labels.numel() == 0:  # nothing masked in this batch (possible on tiny grids): no signal, not NaN
            return output.logits.sum() * 0.0
        return F.cross_entropy(logits, labels)

    def metric_state(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        logits, labels = self._masked(output, batch)
        return {
            "correct": logits.argmax(dim=-1).eq(labels).sum().double(),
            "count": torch.tensor(float(labels.numel()), dtype=torch.float64),
        }

    def compute_metrics(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {"mim_accuracy": float(state["correct"]) / max(float(state["count"]), 1.0)}

    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        weight = state_dict.get("head.lm_head.weight")
        return {} if weight is None else {"vocab_size": weight.shape[0]}

    def hf_config(self) -> dict[str, Any]:
        return {"vocab_size": self.opts.vocab_size}


@hookimpl
def beitdist_register_heads(registry) -> None:
    registry.add(MimHead)
