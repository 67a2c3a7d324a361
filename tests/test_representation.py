"""Representation checks: weighted k-NN and a linear probe on frozen backbone features, on known
answers (separable clusters, shuffled labels) and through `beitdist evaluate --knn --linear-probe`
on the quickstart run."""

from __future__ import annotations

import json

import pytest
import torch

from beitdist.cli import main
from beitdist.representation import Features, knn_top1, linear_probe_top1


def _clusters(n_per_class=40, classes=4, dim=16, spread=0.3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=gen) * 3
    labels = torch.arange(classes).repeat_interleave(n_per_class)
    points = centres[labels] + spread * torch.randn(len(labels), dim, generator=gen)
    return points, labels


def test_separable_classes_score_one_and_shuffled_labels_score_chance():
    train, train_labels = _clusters(seed=0)
    val, val_labels = _clusters(seed=0)
    val = val + 0.05 * torch.randn(val.shape, generator=torch.Generator().manual_seed(9))
    features = Features(train, train_labels, val, val_labels)
    assert knn_top1(features) == 1.0
    assert linear_probe_top1(features) == 1.0
    shuffled = train_labels[torch.randperm(len(train_labels), generator=torch.Generator().manual_seed(1))]
    noise = Features(train, shuffled, val, val_labels)
    assert knn_top1(noise) < 0.5 and linear_probe_top1(noise) < 0.5  # 4 classes: chance is 0.25


def test_knn_votes_are_weighted_by_similarity():
    # one very close neighbour of class 1 outweighs two far ones of class 0 (exp(sim / 0.07))
    train = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.1, 1.0]])
    features = Features(train, torch.tensor([1, 0, 0]), torch.tensor([[1.0, 0.05]]), torch.tensor([1]))
    assert knn_top1(features, k=3) == 1.0


@pytest.mark.slow
def test_evaluate_knn_and_linear_probe_on_the_quickstart_run(quickstart_launch, capsys):
    run_dir, _ = quickstart_launch
    assert main(["evaluate", str(run_dir), "--knn", "--linear-probe"]) == 0
    out = capsys.readouterr().out
    saved = json.loads((run_dir / "eval" / "representation.json").read_text())
    assert saved["dataset"] == "digits" and saved["weights"] in (None, "raw", "ema")
    metrics = saved["metrics"]
    # the quickstart reaches >= 90% val top-1: its features separate the digits about as well
    assert metrics["knn_top1"] > 0.85 and metrics["linear_probe_top1"] > 0.85, metrics
    assert f"knn_top1 {metrics['knn_top1']:.4f}" in out


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_representation_checks_during_training_on_two_ranks(stage, tmp_path):
    """`train.representation`: k-NN and the probe at the evaluations whose step is a multiple of
    `every`, equal on both ranks (ZeRO-3: the feature forwards stay in step), in the eval history
    and the final metrics."""
    from tests.distributed import TINY_RECIPE, merge, result_of, run_recipe

    recipe = merge(TINY_RECIPE, {"name": f"repr{stage}", "engine": {"zero_stage": stage},
                                 "data": {"val_batch_size": 64},
                                 "train": {"steps": 6, "eval_every": 2,
                                           "representation": {"every": 4, "max_train_images": 300}}})
    out = run_recipe(recipe, tmp_path)
    history = result_of(recipe, tmp_path)["eval_history"]
    by_step = {e["step"]: e for e in history}
    assert sorted(by_step) == [2, 4, 6]
    assert "val_knn_top1" not in by_step[2] and "val_knn_top1" not in by_step[6]
    assert 0.1 < by_step[4]["val_knn_top1"] <= 1.0 and 0.1 < by_step[4]["val_linear_probe_top1"] <= 1.0
    assert "representation check on 384 train / 360 val images" in out.stderr  # 300 -> 3 batches x 64 x 2 ranks


def test_a_bare_checkpoint_needs_out_and_a_split_without_labels_is_one_line(tmp_path, capsys, monkeypatch):
    from beitdist.backbone.config import BackboneConfig
    from beitdist.checkpoint import save_checkpoint
    from beitdist.errors import InputError
    from beitdist.model import build_model
    from beitdist.representation import labels_of

    config = BackboneConfig(embed_dim=32, depth=2, num_heads=2, image_size=(32, 32), patch_size=8)
    source = save_checkpoint(build_model(config, "classification", {"num_classes": 10}), tmp_path / "ckpt")
    monkeypatch.chdir(tmp_path)
    assert main(["evaluate", str(source), "--data", "digits", "--knn"]) == 2
    assert "say where the results go with --out" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing written in the working directory
    assert main(["evaluate", str(source), "--data", "digits", "--knn", "--out", str(tmp_path / "r.json")]) == 0
    assert json.loads((tmp_path / "r.json").read_text())["metrics"]["knn_top1"] > 0.1
    with pytest.raises(InputError, match="need class labels, and dataset 'tar_shards' gives none"):
        labels_of({"pixel_values": torch.zeros(1)}, "tar_shards")
