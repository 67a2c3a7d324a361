"""`beitdist.run.evaluator.Evaluator` streams the validation loader and still gives every rank the
same number of forwards (ZeRO-3 gathers parameters inside each one): ranks with uneven shards (a
streaming dataset) agree batch by batch whether anyone has another, the ones that ran out run a
filler forward left out of the metrics, and the metrics equal one rank evaluating everything.

Two gloo ranks in spawned processes, a tiny model and a plain engine stand-in; the loaders are
iterables without a length (as a streaming dataset's), counted as they are consumed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from beitdist.backbone import variant
from beitdist.model import build_model
from beitdist.run.evaluator import Evaluator

BATCH_SIZES = (5, 3, 7, 4, 6)
"""The validation set, in batches; rank 0 gets the first three, rank 1 the other two (uneven)."""
SHARDS = {1: {0: [0, 1, 2, 3, 4]}, 2: {0: [0, 1, 2], 1: [3, 4]}}


def _batch(i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    size = BATCH_SIZES[i]
    return {"pixel_values": torch.randn(size, 3, 16, 16, generator=g),
            "labels": torch.randint(0, 10, (size,), generator=g)}


class _Engine:
    """What the Evaluator asks of an engine: forward, eval/train; counts the forwards."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.forwards, self.modes = module, 0, []

    def forward(self, pixels, mask=None):
        self.forwards += 1
        return self.module(pixels, mask)

    def eval(self):
        self.modes.append("eval")
        self.module.eval()

    def train(self):
        self.modes.append("train")
        self.module.train()


class _Stream:
    """An iterable without a length that records how far it was read (nothing is held)."""

    def __init__(self, indices: list[int]) -> None:
        self.indices, self.read = indices, 0

    def __iter__(self):
        for i in self.indices:
            self.read += 1
            yield _batch(i)


def _model() -> torch.nn.Module:
    """The tiny classifier every rank and the test build alike; a random head (not the usual near-zero
    one), so that images differ in their loss."""
    torch.manual_seed(0)
    config = variant("tiny", embed_dim=32, depth=2, num_heads=2, image_size=16, patch_size=4, drop_path_rate=0.0)
    module = build_model(config, "classification", {"num_classes": 10})
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in module.head.parameters():
            parameter.normal_(0.0, 1.0, generator=g)
    return module


def _evaluate(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        module = _model()
        engine, stream = _Engine(module), _Stream(SHARDS[world][rank])
        evaluator = Evaluator(engine, module, stream, dict, torch.device("cpu"), rank, "whole")
        metrics = evaluator.evaluate()
        record = {"metrics": metrics, "forwards": engine.forwards, "counted": evaluator.forwards,
                  "read": stream.read, "modes": engine.modes}
        Path(out, f"rank_{rank}.json").write_text(json.dumps(record))
    finally:
        dist.destroy_process_group()


def _run(world: int, tmp_path: Path) -> list[dict]:
    out = tmp_path / f"world{world}"
    out.mkdir()
    init = f"file://{tmp_path / f'rendezvous{world}'}"
    mp.spawn(_evaluate, args=(world, init, str(out)), nprocs=world, join=True)
    return [json.loads((out / f"rank_{r}.json").read_text()) for r in range(world)]


def test_uneven_shards_on_two_ranks_give_the_metrics_of_one(tmp_path):
    (one,) = _run(1, tmp_path)
    two = _run(2, tmp_path)
    assert one["forwards"] == 5 and one["read"] == 5
    # every rank runs as many forwards as the rank with the most batches; each batch is read once
    assert [r["forwards"] for r in two] == [3, 3] and [r["read"] for r in two] == [3, 2]
    assert all(r["modes"] == ["eval", "train"] for r in (one, *two))
    assert [r["counted"] for r in (one, *two)] == [5, 3, 3]
    assert set(one["metrics"]) == {"val_loss", "val_top1", "val_top5"}
    for r in two:
        assert r["metrics"].keys() == one["metrics"].keys()
        assert r["metrics"] == pytest.approx(one["metrics"], rel=1e-9, abs=1e-12)
    # val_loss is the mean over the 25 images, not over the 5 batches of 3 to 7
    module = _model().eval()
    with torch.no_grad():
        per_image = [float(module.loss(module(batch["pixel_values"][j:j + 1]), {"labels": batch["labels"][j:j + 1]}))
                     for batch in map(_batch, range(len(BATCH_SIZES))) for j in range(batch["labels"].shape[0])]
    assert one["metrics"]["val_loss"] == pytest.approx(sum(per_image) / len(per_image), rel=1e-5)
