"""`train.representation`: k-NN top-1 and a linear probe of the backbone's features during training,
as part of an evaluation (`beitdist.representation` computes them).

Every rank extracts the features of its shard of both labelled splits through the engine's own
forward (its precision; under ZeRO-3 its parameter gathering, so the ranks agree before each
forward whether anyone still has a batch, as the evaluator does). The shards are then gathered, so
every rank computes the same metrics from the same features and reports the same numbers. A split
cut into shards repeats a few samples so the shards are even (as the evaluation does).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.distributed as dist

from beitdist.errors import InputError
from beitdist.representation import Features, knn_top1, labels_of, linear_probe_top1, pooled
from beitdist.run.collectives import any_rank

log = logging.getLogger(__name__)


class RepresentationCheck:
    def __init__(self, engine: Any, module: Any, recipe: Any, rank: int, world: int, device: torch.device) -> None:
        head = module.head
        if head is not None and head.needs == "pyramid":
            raise InputError(f"train.representation: head {head.name!r} runs only some blocks (needs 'pyramid'); "
                             "representation checks need a head that runs the whole backbone")
        from beitdist.data.pipeline import build_labelled_eval_loaders

        config = module.config
        self.train_loader, self.val_loader = build_labelled_eval_loaders(
            recipe.data, config.image_size[0], config.patch_size, seed=recipe.seed, rank=rank, world_size=world)
        self.engine, self.device, self.world = engine, device, world
        self.section = recipe.train.representation
        self.seed, self.dataset = recipe.seed, recipe.data.dataset
        batch = recipe.data.val_batch_size or recipe.data.batch_size
        # the same number of train batches on every rank: the cap is cut evenly across them
        self.max_train_batches = math.ceil(self.section.max_train_images / (world * batch))

    def due(self, step: int) -> bool:
        return bool(self.section.every) and step % self.section.every == 0

    def _features(self, loader: Iterable[Mapping[str, Any]], max_batches: int | None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        feats: list[torch.Tensor] = []
        labels: list[torch.Tensor] = []
        batches = iter(loader)
        last: torch.Tensor | None = None
        done = 0
        while True:
            raw = next(batches, None) if max_batches is None or done < max_batches else None
            if not any_rank(raw is not None, self.device):
                break
            if raw is None:  # this rank ran out: a filler forward keeps ZeRO-3's gathers in step
                if last is None:
                    raise InputError("train.representation: a rank has no images of a labelled split (fewer "
                                     "images than ranks)")
                self.engine.forward(last, None)
                continue
            labels.append(labels_of(raw, self.dataset))
            last = raw["pixel_values"].to(self.device)
            feats.append(pooled(self.engine.forward(last, None)).cpu())
            done += 1
        local = (torch.cat(feats) if feats else torch.zeros(0), torch.cat(labels) if labels else torch.zeros(0))
        if self.world == 1:
            return local
        gathered: list[Any] = [None] * self.world
        dist.all_gather_object(gathered, local)
        return torch.cat([g[0] for g in gathered]), torch.cat([g[1] for g in gathered])

    @torch.no_grad()
    def measure(self) -> dict[str, float]:
        """`val_knn_top1` / `val_linear_probe_top1`, equal on every rank."""
        start = time.time()
        self.engine.eval()
        try:
            train, train_labels = self._features(self.train_loader, self.max_train_batches)
            val, val_labels = self._features(self.val_loader, None)
        finally:
            self.engine.train()
        features = Features(train, train_labels, val, val_labels)
        metrics: dict[str, float] = {}
        if self.section.knn:
            metrics["val_knn_top1"] = knn_top1(features)
        if self.section.linear_probe:
            with torch.enable_grad():
                metrics["val_linear_probe_top1"] = linear_probe_top1(features, seed=self.seed)
        log.info("representation check on %d train / %d val images in %.1f s", train.shape[0], val.shape[0],
                 time.time() - start)
        return metrics
