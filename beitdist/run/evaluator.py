"""Evaluation of one rank's validation shard, streamed.

The loader is iterated, never materialised: a rank holds one batch at a time (plus the last one it
saw). Ranks may hold different numbers of batches (a streaming dataset shards unevenly), while
ZeRO-3 gathers parameters collectively inside every forward, so every rank must run the same
number of forwards. Before each forward the ranks agree, with one all-reduce(MAX) of a "this rank
has another batch" flag, whether anyone still has one; a rank that ran out repeats a forward on
its last batch and leaves it out of the metrics. The metrics are the sums over the real batches
of every rank, reduced once at the end: the same numbers whether the shards are even or not.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from beitdist.errors import InputError
from beitdist.run.collectives import all_reduced, any_rank

Batch = dict[str, torch.Tensor]


class Evaluator:
    """`evaluate()` runs the head's `evaluate_batch` over the validation loader in eval mode and
    returns `val_<metric>` (the head's `compute_metrics` of the summed `metric_state`) and
    `val_loss`: each batch's loss weighted by its images (as timm's validate), so a short last
    batch or a rank with fewer images does not count as much as a full one."""

    def __init__(self, engine: Any, module: Any, loader: Iterable[Mapping[str, Any]] | None,
                 prepare: Callable[[Mapping[str, Any]], Batch], device: torch.device, rank: int,
                 mode: str) -> None:
        self.engine, self.module, self.loader = engine, module, loader
        self.prepare, self.device, self.rank = prepare, device, rank
        self.mode = mode  # the head decides what it means (segmentation: sliding windows)
        self.forwards = 0
        """Forwards run by the last `evaluate()` on this rank (real and filler): equal on every rank."""
        self.sample: Batch | None = None
        """A few examples of the first validation batch (CPU), for pictures of the validation split."""

    def evaluate(self) -> dict[str, float]:
        if self.loader is None:
            return {}
        self.engine.eval()
        head = self.module.head
        totals: dict[str, torch.Tensor] = {}
        loss_sum, images = torch.zeros((), dtype=torch.float64), 0
        self.forwards = 0
        with torch.no_grad():
            batches = iter(self.loader)
            last: Batch | None = None
            raw = next(batches, None)
            if any_rank(raw is None, self.device):  # decided together: one rank raising alone would hang the rest
                raise InputError("a rank has no validation batches (the validation split has fewer samples or "
                                 "shards than ranks); use a larger validation split or fewer workers")
            while True:
                if not any_rank(raw is not None, self.device):
                    break
                if raw is None:  # this rank ran out: a filler forward keeps ZeRO-3's gathers in step
                    head.evaluate_batch(self.engine.forward, last, self.mode)
                    self.forwards += 1
                    raw = next(batches, None)
                    continue
                batch = last = self.prepare(raw)
                if self.sample is None:
                    self.sample = sample_of(batch)
                raw = next(batches, None)
                out = head.evaluate_batch(self.engine.forward, batch, self.mode)
                self.forwards += 1
                size = int(batch["pixel_values"].shape[0])
                loss_sum += float(self.module.loss(out, batch)) * size
                images += size
                for key, value in head.metric_state(out, batch).items():
                    totals[key] = totals.get(key, 0) + value.double().cpu()
        keys = sorted(totals)
        # one all-reduce for every sum, scalars and vectors alike (per-class counts, code counts)
        packed = torch.cat([totals[k].reshape(-1) for k in keys]) if keys else torch.zeros(0, dtype=torch.float64)
        packed = all_reduced(packed, self.device)
        stats = all_reduced(torch.tensor([float(loss_sum), float(images)], dtype=torch.float64), self.device)
        sizes = [totals[k].numel() for k in keys]
        reduced = {k: part.reshape(totals[k].shape) for k, part in zip(keys, packed.split(sizes), strict=True)}
        metrics = {f"val_{k}": v for k, v in head.compute_metrics(reduced).items()}
        metrics["val_loss"] = float(stats[0]) / max(float(stats[1]), 1.0)
        self.engine.train()
        return metrics


def sample_of(batch: Mapping[str, Any], count: int = 4) -> Batch:
    """A few examples of a batch, on the CPU, for callbacks that draw pictures (MLflow)."""
    size = batch["pixel_values"].shape[0]
    return {k: v[:count].detach().cpu() for k, v in batch.items()
            if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == size}
