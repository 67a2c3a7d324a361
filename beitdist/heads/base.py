"""The head contract: what every head (built-in or third-party) declares and implements.

Everything the rest of beitdist asks about a head is asked of the head itself: the data pipeline
reads `data_needs`, the training loop calls `loss`, `evaluate_batch` and the metric methods, the
MLflow callback calls `pictures`, and checkpoint conversion reads the `hf_*` / `unilm_*`
declarations. No module outside `beitdist.heads` branches on a head's name, so a head from another
package is served exactly like a built-in one.

What a head declares (class attributes):

- `name`: the name recipes and `load_model(head=...)` use.
- `Options`: a dataclass, the schema of the head's recipe section (`head.options`); its
  `__post_init__` checks ranges with `beitdist.schema.check`, so bad values name their field.
- `needs`: what the model hands to `forward`: "pooled" (B, D), "tokens" (B, 1 + N, D),
  "pyramid" (NCHW maps of the blocks at `self.block_indices`) or "states" (`BackboneStates`:
  every block's tokens and the shared relative position bias).
- `pooling`: backbone poolings it works with (the first is chosen when building), or None.
- `uses_mask`: True when it needs the backbone's mask token (masked image modeling).
- `data_needs`: a `DataNeeds`, what its batches contain (class labels, label maps, a mask, a
  tokenizer view). Default: class labels, or, for a head with `uses_mask` that declares nothing,
  a mask without labels or tokenizer (masked pixel regression, SimMIM / MAE style).
- conversion, optional (a head without it is saved and loaded as a beitdist checkpoint only):
  `hf_architecture` (transformers' task model class), `hf_keys` / `unilm_keys` (`KeyMap`s: its
  weights' names in those layouts, and the keys that identify it), `hf_pooler`.

What it implements:

- `__init__(backbone: BackboneConfig, options: Options)`.
- `forward(features, bool_masked_pos) -> Tensor | HeadOutput`.
- `loss(output, batch) -> Tensor`: a scalar from the model output and the batch dict.
- `metric_state(output, batch) -> dict[str, Tensor]`: SUMS over the batch (counts,
  intersections, ...) that can be all-reduced across ranks and accumulated over batches;
  `compute_metrics(state) -> dict[str, float]` turns the totals into the reported metrics.
- optionally `evaluate_batch` (how a validation batch is run: sliding windows, ...), `pictures`
  (what MLflow shows), `detail_state` / `report` (the details `beitdist evaluate` writes beyond the
  scalar metrics: per-class numbers, a confusion matrix), and for conversion
  `options_from_state_dict`, `options_from_hf`, `hf_config`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import torch
from torch import nn

from beitdist.backbone.config import BackboneConfig
from beitdist.data.needs import DataNeeds
from beitdist.heads.keymap import KeyMap
from beitdist.schema import parse, plugin_class_problems, to_dict

if TYPE_CHECKING:
    from PIL.Image import Image

    from beitdist.model import BeitForTask, ModelOutput

Needs = Literal["pyramid", "pooled", "tokens", "states"]
NEEDS: tuple[str, ...] = ("pooled", "tokens", "pyramid", "states")
Forward = Callable[..., "ModelOutput"]
"""`forward(pixel_values, bool_masked_pos) -> ModelOutput` (both positional; the mask may be None):
the whole model, as the training engine runs it (its precision, its parameter gathering)."""


@dataclass
class BackboneStates:
    """What a head with `needs == "states"` receives: every block's tokens, for heads that read
    more than the last block (BEiT v2's patch aggregation reads an early one too)."""

    hidden_states: tuple[torch.Tensor, ...]
    """(B, 1 + N, D) after the embedding, then after each block (depth + 1 entries; no final norm)."""
    shared_bias: torch.Tensor | None
    """The backbone's shared relative position bias (None unless rel_pos_bias is "shared"), for
    blocks the head runs itself."""


@dataclass
class HeadOutput:
    """What a head with more than one output returns (segmentation: main and auxiliary logits)."""

    logits: torch.Tensor
    aux_logits: torch.Tensor | None = None


@dataclass(frozen=True)
class NoOptions:
    """A head without options."""


CLASS_LABELS = DataNeeds()
MASK_ONLY = DataNeeds(labels=None, mask=True)


class Head(nn.Module):
    name: ClassVar[str]
    Options: ClassVar[type] = NoOptions
    needs: ClassVar[Needs]
    pooling: ClassVar[tuple[str, ...] | None] = None
    uses_mask: ClassVar[bool] = False
    data_needs: ClassVar[DataNeeds] = CLASS_LABELS
    """What its batches contain; see `beitdist.data.needs`."""
    prediction: ClassVar[Literal["classes", "label_map"] | None] = None
    """What `beitdist predict` writes for it: "classes" (top-k class ids over `logits` (B, C), as
    a CSV), "label_map" (per-pixel classes from `logits` (B, C, h, w), as PNGs at the input's
    size), or None: the head predicts nothing a file can hold (masked image modeling)."""
    block_indices: tuple[int, ...] = ()
    """For `needs == "pyramid"`: the 0-based blocks whose outputs `forward` receives."""

    hf_architecture: ClassVar[str | None] = None
    """transformers' task model (config.json "architectures"); None: `export_hf` refuses the head."""
    hf_keys: ClassVar[KeyMap | None] = None
    """Its weights in transformers' on-disk layout (the task model's keys outside `beit.`); keys
    no pair names map to and from `head.<key>` unchanged."""
    hf_pooler: ClassVar[bool] = True
    """Whether transformers' task model builds its BeitModel with the pooler (mean-pooling norm)."""
    unilm_keys: ClassVar[KeyMap | None] = None
    """Its weights in unilm / timm / mmseg checkpoints (after their `backbone.`, `module.`,
    `encoder.` prefixes); keys no pair names are the backbone's."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.uses_mask and cls.data_needs is CLASS_LABELS:
            cls.data_needs = MASK_ONLY  # a masked-image head that declared nothing: masks, no labels

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

    # ------------------------------------------------------------- training
    def forward(self, features: Any, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor | HeadOutput:
        raise NotImplementedError(f"head {type(self).__name__} must implement forward")

    def loss(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError(f"head {type(self).__name__} must implement loss")

    # ----------------------------------------------------------- evaluation
    def evaluate_batch(self, forward: Forward, batch: Mapping[str, torch.Tensor], mode: str = "whole") -> ModelOutput:
        """The output that `loss` and `metric_state` score for one validation batch. `mode` is the
        recipe's `train.eval_mode` ("whole" or "slide"); a head without a sliding-window
        inference (this default) runs the batch as it is whatever the mode. It may call `forward`
        several times (windows), but the count must depend only on the batch's shape: under ZeRO-3
        every rank must run the same number of forwards, and the evaluator equalises calls of
        this method, not forwards."""
        return forward(batch["pixel_values"], batch.get("bool_masked_pos"))

    def metric_state(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {}

    def compute_metrics(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return {}

    def detail_state(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Extra SUMS for `report`, gathered only by `beitdist evaluate` (never during training, where
        a (classes x classes) confusion matrix all-reduced at every evaluation would cost too much)."""
        return {}

    def report(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """JSON-able details from the summed `metric_state` and `detail_state` (per-class accuracy,
        per-class IoU, a confusion matrix, ...), written by `beitdist evaluate` beside the metrics."""
        return {}

    # -------------------------------------------------------------- pictures
    @classmethod
    def pictures(cls, batch: Mapping[str, torch.Tensor], model: Callable[[], BeitForTask | None]) -> dict[str, Image]:
        """PNG-ready images (file name -> PIL image) of a few examples `batch` (CPU tensors, as the
        data pipeline made them: validation examples when the run has them at the model's input
        size, else training ones); the MLflow callback logs them at the end of a run. `model()` gives the trained model (None when there is none to run): call it only to
        draw predictions, since it may load the final weights. Default: the inputs and, when the
        batch has a mask, the masked patches in grey (`beitdist.heads.pictures`)."""
        from beitdist.heads.pictures import inputs_and_masks

        return inputs_and_masks(batch)

    # ------------------------------------------------------------ conversion
    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Options the shapes of a foreign checkpoint's weights fix (beitdist keys), e.g. the
        number of classes; only called for checkpoints whose keys this head's KeyMap recognised."""
        return {}

    @classmethod
    def options_from_hf(cls, hf_config: Mapping[str, Any], backbone: BackboneConfig) -> dict[str, Any]:
        """Options a transformers config.json fixes beyond the shapes (they override those);
        raise `beitdist.CheckpointError` for a config this head cannot express."""
        return {}

    def hf_config(self) -> dict[str, Any]:
        """This head's entries of transformers' config.json (the backbone's are written for it);
        raise `beitdist.CheckpointError` for options transformers cannot express."""
        return {}


def contract_problems(cls: Any) -> list[str]:
    """What a class registered as a head lacks; empty when it honours the contract."""
    problems = plugin_class_problems(cls, Head, "beitdist.heads.Head", ("forward", "loss"))
    if problems and "is not a subclass" in problems[0]:
        return problems
    if getattr(cls, "needs", None) not in NEEDS:
        problems.insert(0, f"needs must be one of {', '.join(NEEDS)}, got {getattr(cls, 'needs', None)!r}")
    data_needs = getattr(cls, "data_needs", None)
    if not isinstance(data_needs, DataNeeds):
        problems.append(f"data_needs must be a beitdist.data.needs.DataNeeds, got {data_needs!r}")
    elif cls.uses_mask and not data_needs.mask:
        problems.append("uses_mask is True but data_needs has no mask: its batches would carry no bool_masked_pos")
    for attr in ("hf_keys", "unilm_keys"):
        value = getattr(cls, attr, None)
        if value is not None and not isinstance(value, KeyMap):
            problems.append(f"{attr} must be a beitdist.heads.KeyMap or None, got {value!r}")
    if cls.hf_architecture is not None and cls.hf_keys is None:
        problems.append("hf_architecture is set but hf_keys is not: transformers' keys of the head are unknown")
    return problems
