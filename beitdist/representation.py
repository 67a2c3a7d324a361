"""How good a backbone's features are without fine-tuning it: k-NN top-1 and a linear probe on
the features of a labelled dataset (both splits, evaluation transform).

These are the checks self-supervised work reports between pretraining and fine-tuning (DINO's
weighted k-NN; BEiT's and BEiT v2's linear probes), and the quickest way to see whether MIM
pretraining is learning anything. Features: the backbone's pooled vector when it has a pooling
(mean-pooling norm, or the CLS token), else the mean of the last block's patch tokens (a MIM
pretraining backbone has no pooling).

- k-NN (`knn_top1`): cosine similarity to every train feature; the k nearest vote for their class
  with weight exp(similarity / T) (DINO: k = 20, T = 0.07).
- Linear probe (`linear_probe_top1`): features standardised with the train split's statistics,
  one linear layer trained full-batch with L-BFGS on cross-entropy plus a small L2 penalty
  (a logistic regression, as scikit-learn's would be), seeded.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

KNN_K = 20
KNN_TEMPERATURE = 0.07


@dataclass(frozen=True)
class Features:
    train: torch.Tensor
    train_labels: torch.Tensor
    val: torch.Tensor
    val_labels: torch.Tensor


def pooled(out: Any) -> torch.Tensor:
    """(B, D) features of a model or backbone output (see the module docstring)."""
    if out.pooler_output is not None:
        return out.pooler_output.float()
    return out.last_hidden_state[:, 1:].mean(dim=1).float()


@torch.no_grad()
def pooled_features(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """(B, D) features of a batch, from the backbone alone."""
    return pooled((model.backbone if hasattr(model, "backbone") else model)(pixel_values))


def labels_of(batch: Any, dataset: str) -> torch.Tensor:
    """The batch's class ids; InputError when the dataset gives none (representation checks need them)."""
    if "labels" not in batch:
        from beitdist.errors import InputError

        raise InputError(f"representation checks need class labels, and dataset {dataset!r} gives none with these "
                         "options (for tar shards: set data.options.label_ext)")
    return batch["labels"].long().cpu()


@torch.no_grad()
def extract(model: Any, loader: Any, device: torch.device, max_images: int | None = None, dataset: str = ""
            ) -> tuple[torch.Tensor, torch.Tensor]:
    feats, labels, seen = [], [], 0
    for batch in loader:
        pixels = batch["pixel_values"].to(device)
        labels.append(labels_of(batch, dataset))
        feats.append(pooled_features(model, pixels).cpu())
        seen += pixels.shape[0]
        if max_images is not None and seen >= max_images:
            break
    if not feats:
        from beitdist.errors import InputError

        raise InputError("representation check: the split holds no images")
    x, y = torch.cat(feats), torch.cat(labels)
    return (x[:max_images], y[:max_images]) if max_images is not None else (x, y)


def features_of(model: Any, recipe: Any, device: torch.device | None = None, max_train: int | None = None
                ) -> Features:
    """Features of both splits of the recipe's dataset (class labels, evaluation transform)."""
    from beitdist.data.pipeline import build_labelled_eval_loaders

    device = device or torch.device("cpu")
    model = model.to(device).eval()
    config = model.config
    train_loader, val_loader = build_labelled_eval_loaders(recipe.data, config.image_size[0], config.patch_size,
                                                           seed=recipe.seed)
    train, train_labels = extract(model, train_loader, device, max_train, recipe.data.dataset)
    val, val_labels = extract(model, val_loader, device, dataset=recipe.data.dataset)
    return Features(train, train_labels, val, val_labels)


def knn_top1(features: Features, k: int = KNN_K, temperature: float = KNN_TEMPERATURE) -> float:
    """Weighted k-NN top-1 on the val split (cosine similarity, DINO's vote)."""
    bank = F.normalize(features.train, dim=-1)
    query = F.normalize(features.val, dim=-1)
    classes = int(max(features.train_labels.max(), features.val_labels.max())) + 1
    k = min(k, bank.shape[0])
    correct = 0
    for start in range(0, query.shape[0], 1024):
        sims, idx = (query[start:start + 1024] @ bank.t()).topk(k, dim=-1)
        weights = (sims / temperature).exp()
        votes = torch.zeros(sims.shape[0], classes).scatter_add_(1, features.train_labels[idx], weights)
        correct += int(votes.argmax(dim=-1).eq(features.val_labels[start:start + 1024]).sum())
    return correct / query.shape[0]


def linear_probe_top1(features: Features, weight_decay: float = 1e-4, steps: int = 100, seed: int = 0) -> float:
    """Top-1 on the val split of a logistic regression trained on the train split's features."""
    mean, std = features.train.mean(0), features.train.std(0).clamp_min(1e-6)
    x, val = (features.train - mean) / std, (features.val - mean) / std
    classes = int(max(features.train_labels.max(), features.val_labels.max())) + 1
    generator = torch.Generator().manual_seed(seed)
    weight = (torch.randn(x.shape[1], classes, generator=generator) * 0.01).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, features.train_labels) + weight_decay * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float((val @ weight + bias).argmax(dim=-1).eq(features.val_labels).float().mean())


def representation_metrics(model: Any, recipe: Any, knn: bool = True, linear: bool = True,
                           device: torch.device | None = None, max_train: int | None = None) -> dict[str, float]:
    """`knn_top1` / `linear_probe_top1` of the model's backbone on the recipe's labelled data."""
    start = time.time()
    features = features_of(model, recipe, device, max_train)
    metrics: dict[str, float] = {}
    if knn:
        metrics["knn_top1"] = knn_top1(features)
    if linear:
        metrics["linear_probe_top1"] = linear_probe_top1(features, seed=recipe.seed)
    log.info("representation of %d train / %d val images in %.1f s: %s", features.train.shape[0],
             features.val.shape[0], time.time() - start, metrics)
    return metrics
