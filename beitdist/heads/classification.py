"""Image classification: pooled vector -> dropout -> Linear (unilm's init, scaled by 0.001)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from beitdist.backbone.config import BackboneConfig
from beitdist.backbone.layers import TruncNormalLinear
from beitdist.heads.base import Head
from beitdist.heads.keymap import KeyMap
from beitdist.hookspecs import hookimpl
from beitdist.schema import check

if TYPE_CHECKING:
    from PIL.Image import Image

    from beitdist.model import BeitForTask, ModelOutput


@dataclass(frozen=True)
class ClassificationOptions:
    num_classes: int = 1000
    init_scale: float = 0.001
    """The classifier's trunc-normal init is multiplied by this (unilm: 0.001)."""
    dropout: float = 0.0
    label_smoothing: float = 0.1
    """Applied to hard labels; soft targets (mixup/cutmix) arrive already smoothed."""

    def __post_init__(self) -> None:
        check(self.num_classes > 0, "num_classes", f"expected a positive int, got {self.num_classes}")
        check(0.0 <= self.dropout < 1.0, "dropout", f"expected a value in [0, 1), got {self.dropout}")
        check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", f"expected [0, 1), got {self.label_smoothing}")


MAX_CONFUSION_CLASSES = 1000


class ClassificationHead(Head):
    name = "classification"
    Options = ClassificationOptions
    needs = "pooled"
    pooling = ("mean", "cls")
    prediction = "classes"
    hf_architecture = "BeitForImageClassification"
    hf_keys = KeyMap((("classifier", "head.classifier"),))
    unilm_keys = KeyMap((("head", "head.classifier"),))  # unilm's and timm's `head` Linear

    def __init__(self, backbone: BackboneConfig, options: ClassificationOptions | None = None) -> None:
        super().__init__(backbone, options)
        self.dropout = nn.Dropout(self.opts.dropout)
        self.classifier = TruncNormalLinear(backbone.embed_dim, self.opts.num_classes, init_scale=self.opts.init_scale)

    def forward(self, features: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.dropout(features))

    def loss(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits, labels = output.logits.float(), batch["labels"]
        if labels.is_floating_point():  # soft targets from mixup / cutmix
            return torch.sum(-labels * F.log_softmax(logits, dim=-1), dim=-1).mean()
        return F.cross_entropy(logits, labels, label_smoothing=self.opts.label_smoothing)

    def metric_state(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        labels = batch["labels"]
        if labels.is_floating_point():
            labels = labels.argmax(dim=-1)
        k = min(5, output.logits.shape[-1])
        top = output.logits.topk(k, dim=-1).indices
        hits = top.eq(labels.unsqueeze(-1))
        return {
            "correct_top1": hits[:, 0].sum().double(),
            "correct_top5": hits.any(dim=-1).sum().double(),
            "count": torch.tensor(float(labels.numel()), dtype=torch.float64),
        }

    def compute_metrics(self, state: Mapping[str, torch.Tensor]) -> dict[str, float]:
        count = max(float(state["count"]), 1.0)
        return {"top1": float(state["correct_top1"]) / count, "top5": float(state["correct_top5"]) / count}

    def detail_state(self, output: ModelOutput, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The confusion matrix: rows true classes, columns predicted ones."""
        labels = batch["labels"]
        if labels.is_floating_point():
            labels = labels.argmax(dim=-1)
        k = self.opts.num_classes
        pairs = labels.long().reshape(-1) * k + output.logits.argmax(dim=-1).reshape(-1)
        return {"confusion": torch.bincount(pairs, minlength=k * k).double().reshape(k, k)}

    def report(self, state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        """Per-class accuracy (None for a class without samples) and, up to 1000 classes, the
        confusion matrix (larger ones only as a picture would be unreadable and the JSON huge)."""
        confusion = state.get("confusion")
        if confusion is None:
            return {}
        support = confusion.sum(dim=1)
        correct = confusion.diagonal()
        details: dict[str, Any] = {
            "per_class_accuracy": [float(c / n) if n > 0 else None for c, n in zip(correct, support)],
            "support": [int(n) for n in support],
        }
        if self.opts.num_classes <= MAX_CONFUSION_CLASSES:
            details["confusion_matrix"] = confusion.long().tolist()
        return details

    @classmethod
    def pictures(cls, batch: Mapping[str, torch.Tensor], model: Callable[[], BeitForTask | None]) -> dict[str, Image]:
        """`labelled.png`: the examples with their true class and, with a trained model, its
        prediction (green when right, red when wrong)."""
        from beitdist.heads.pictures import labelled_grid, pixels

        images, labels = pixels(batch), batch["labels"]
        if labels.is_floating_point():  # mixup / cutmix targets: the dominant class
            labels = labels.argmax(dim=-1)
        true = [str(int(v)) for v in labels]
        predicted = None
        trained = model()
        if trained is not None:
            param, was_training = next(trained.parameters()), trained.training
            try:
                with torch.no_grad():
                    logits = trained.eval()(images.to(param.device, param.dtype)).logits
            finally:
                trained.train(was_training)
            predicted = [str(int(v)) for v in logits.argmax(dim=-1).cpu()]
        return {**super().pictures(batch, model), "labelled.png": labelled_grid(images, true, predicted)}

    @classmethod
    def options_from_state_dict(cls, state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
        weight = state_dict.get("head.classifier.weight")
        return {} if weight is None else {"num_classes": weight.shape[0]}

    @classmethod
    def options_from_hf(cls, hf_config: Mapping[str, Any], backbone: BackboneConfig) -> dict[str, Any]:
        """The class count from id2label (transformers' num_labels) when it names any."""
        count = len(hf_config.get("id2label") or {})
        return {"num_classes": count} if count else {}

    def hf_config(self) -> dict[str, Any]:
        return _labels(self.opts.num_classes)


def _labels(count: int) -> dict[str, Any]:
    """transformers' default label names for `count` classes (config.json's id2label / label2id)."""
    return {"id2label": {str(i): f"LABEL_{i}" for i in range(count)},
            "label2id": {f"LABEL_{i}": i for i in range(count)}}


@hookimpl
def beitdist_register_heads(registry) -> None:
    registry.add(ClassificationHead)
