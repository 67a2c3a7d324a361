"""`beitdist evaluate`: a run's evaluation reproduced exactly (1 process or 2), per-class details and
the confusion matrix, bare checkpoints with --data, segmentation's multi-scale + flip inference, and
the per-class IoU against a hand count."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from beitdist.backbone.config import variant
from beitdist.distributed import free_port
from beitdist.heads.segmentation_eval import intersect_and_union, metrics_from_areas, per_class_report, resize_logits
from beitdist.model import build_model
from tests.distributed import TINY_RECIPE, merge, result_of, run_recipe

RECIPE = merge(TINY_RECIPE, {"name": "evaluated", "train": {"steps": 8}, "data": {"val_batch_size": 50},
                             "tracking": {"enabled": True}})


def _evaluate(args, cwd, nproc=1, timeout=300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    if nproc == 1:
        cmd = [sys.executable, "-m", "beitdist", "evaluate", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               f"--master_port={free_port()}", "-m", "beitdist", "evaluate", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny classification run trained on 2 gloo ranks, with its MLflow store."""
    tmp = tmp_path_factory.mktemp("evaluate")
    run_recipe(RECIPE, tmp, nproc=2)
    return tmp / "runs" / RECIPE["name"], result_of(RECIPE, tmp)


@pytest.mark.slow
def test_evaluate_reproduces_the_runs_final_metrics_on_one_and_on_two_processes(trained, tmp_path):
    run_dir, result = trained
    one = _evaluate([str(run_dir), "--out", str(tmp_path / "one.json")], tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _evaluate([str(run_dir), "--out", str(tmp_path / "two.json")], tmp_path, nproc=2)
    assert two.returncode == 0, two.stderr[-3000:]
    first, second = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert first["shards"] == 2 and first["images"] == second["images"] == 360
    assert first["metrics"] == result["metrics"]  # the same batches, the same arithmetic: equal to the last bit
    assert second["metrics"] == result["metrics"]
    assert "evaluated 360 images of digits (whole)" in one.stdout


@pytest.mark.slow
def test_evaluate_writes_per_class_details_into_the_run_and_logs_to_its_mlflow_run(trained, tmp_path):
    run_dir, result = trained
    out = _evaluate([str(run_dir)], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((run_dir / "eval" / "whole.json").read_text())
    confusion = torch.tensor(record["confusion_matrix"])
    assert confusion.shape == (10, 10) and int(confusion.sum()) == record["images"] == 360
    assert record["support"] == confusion.sum(dim=1).tolist()
    assert abs(float(confusion.diagonal().sum()) / 360 - record["metrics"]["val_top1"]) < 1e-12
    for i, accuracy in enumerate(record["per_class_accuracy"]):
        assert accuracy == pytest.approx(float(confusion[i, i] / confusion[i].sum()))
    assert "logged to the run's MLflow run" in out.stdout
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run = client.get_run((run_dir / "mlflow_run_id").read_text().strip())
    assert run.data.metrics["eval_whole_top1"] == record["metrics"]["val_top1"]
    # the training run logged its model's cost and the achieved throughput in FLOPs
    assert float(run.data.params["model.gflops_per_image"]) > 0 and run.data.metrics["tflops_per_rank"] > 0
    # and its pictures: validation examples with their true and predicted classes
    assert "pictures/labelled.png" in {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/whole.json", "evaluation/whole.confusion.png"} <= artifacts


@pytest.mark.slow
def test_a_bare_checkpoint_needs_data_and_an_output(trained, tmp_path):
    run_dir, _ = trained
    final = str(run_dir / "final")
    no_data = _evaluate([final], tmp_path)
    assert no_data.returncode == 2 and "name a dataset with --data" in no_data.stderr
    assert len(no_data.stderr.strip().splitlines()) == 1
    no_out = _evaluate([final, "--data", "digits"], tmp_path)
    assert no_out.returncode == 2 and "--out FILE.json" in no_out.stderr
    ok = _evaluate([final, "--data", "digits", "--out", str(tmp_path / "bare.json")], tmp_path)
    assert ok.returncode == 0, ok.stderr[-3000:]
    record = json.loads((tmp_path / "bare.json").read_text())
    # 359 validation images; cut in 2 shards the sampler repeats one to even them out, as the run did
    assert record["shards"] == 1 and record["images"] == 359
    bad = _evaluate([final, "--data", "imagefolder", "--out", str(tmp_path / "x.json")], tmp_path)
    assert bad.returncode == 2 and "unknown dataset 'imagefolder'" in bad.stderr


def test_per_class_iou_against_a_hand_count():
    labels = torch.tensor([[0, 0, 1, 1],
                           [0, 0, 1, 255],
                           [2, 2, 2, 2]])
    pred = torch.tensor([[0, 1, 1, 1],
                         [0, 0, 0, 2],
                         [2, 2, 1, 2]])
    state = intersect_and_union(pred, labels, num_classes=4)
    report = per_class_report(state)
    # class 0: label {4 px}, pred {4 px: (0,0),(1,0),(1,1),(1,2)}, both {3} -> IoU 3 / 5
    # class 1: label {3}, pred {(0,1),(0,2),(0,3),(2,2)} = 4, both {(0,2),(0,3)} = 2 -> IoU 2 / 5
    # class 2: label {4}, pred {(2,0),(2,1),(2,3)} (the ignored pixel does not count) = 3, both 3 -> 3 / 4
    # class 3: never labelled nor predicted -> None
    assert report["per_class_iou"] == [pytest.approx(3 / 5), pytest.approx(2 / 5), pytest.approx(3 / 4), None]
    assert report["per_class_accuracy"] == [pytest.approx(3 / 4), pytest.approx(2 / 3), pytest.approx(3 / 4), None]
    assert report["pixels_per_class"] == [4, 3, 4, 0]
    metrics = metrics_from_areas(state)
    assert metrics["mIoU"] == pytest.approx((3 / 5 + 2 / 5 + 3 / 4) / 3)
    assert metrics["aAcc"] == pytest.approx(8 / 11)


def test_multiscale_flip_differs_from_whole_is_finite_and_runs_a_shape_fixed_number_of_forwards():
    torch.manual_seed(0)
    config = variant("tiny", image_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    model = build_model(config, "segmentation", {"num_classes": 5, "channels": 16, "auxiliary_channels": 8,
                                                 "block_indices": [0, 1, 2, 3]}).eval()
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.randint(0, 5, (2, 32, 32))}
    calls = []

    def forward(x, mask):
        calls.append(tuple(x.shape))
        return model(x, mask)

    whole = model.head.evaluate_batch(forward, batch, "whole")
    calls.clear()
    tta = model.head.evaluate_batch(forward, batch, "ms-flip")
    assert tta.logits.shape == whole.logits.shape[:2] + (32, 32) and torch.isfinite(tta.logits).all()
    probs = tta.logits.exp()
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 32, 32))  # averaged probabilities
    assert not torch.allclose(probs, resize_logits(whole.logits, (32, 32)).softmax(1), atol=1e-4)
    forwards = len(calls)
    calls.clear()
    model.head.evaluate_batch(forward, {**batch, "pixel_values": torch.zeros(2, 3, 32, 32)}, "ms-flip")
    assert len(calls) == forwards and all(shape[-2:] == (32, 32) for shape in calls)
    tta_state = model.head.metric_state(tta, batch)
    whole_state = model.head.metric_state(whole, batch)
    tta_miou, whole_miou = (metrics_from_areas(s)["mIoU"] for s in (tta_state, whole_state))
    assert tta_miou == tta_miou and tta_miou != whole_miou  # finite and not the whole-image number
