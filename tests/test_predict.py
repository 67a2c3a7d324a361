"""`beitdist predict`: a folder of ordinary, corrupt, RGBA, grayscale and non-image files; label
names from the run's dataset; segmentation label maps at each image's size; refusals."""

from __future__ import annotations

import csv
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from beitdist import save_checkpoint
from beitdist.backbone.config import variant
from beitdist.model import build_model
from tests.distributed import TINY_RECIPE, merge, run_recipe


def _predict(args, cwd):
    return subprocess.run([sys.executable, "-m", "beitdist", "predict", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny classification run on the digits (its recipe names the dataset, so the labels)."""
    tmp = tmp_path_factory.mktemp("predict")
    recipe = merge(TINY_RECIPE, {"name": "predictor", "train": {"steps": 2}})
    run_recipe(recipe, tmp, nproc=1)
    return tmp / "runs" / "predictor"


def _folder(root):
    root.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.jpg", "b.png"):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(root / name)
    Image.fromarray(rng.integers(0, 255, (16, 16, 4), dtype=np.uint8), "RGBA").save(root / "alpha.png")
    Image.fromarray(rng.integers(0, 255, (30, 18), dtype=np.uint8), "L").save(root / "grey.png")
    (root / "broken.jpg").write_bytes((root / "a.jpg").read_bytes()[:50])
    (root / "README.txt").write_text("not an image")
    return root


def test_a_mixed_folder_gives_four_predictions_and_one_warning(run_dir, tmp_path):
    folder = _folder(tmp_path / "images")
    out = _predict([str(run_dir), str(folder), "--top-k", "3", "--out", str(tmp_path / "out")], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = list(csv.reader((tmp_path / "out" / "predictions.csv").open()))
    assert rows[0] == ["path", "label_1", "score_1", "label_2", "score_2", "label_3", "score_3"]
    assert sorted(r[0] for r in rows[1:]) == ["images/a.jpg", "images/alpha.png", "images/b.png", "images/grey.png"]
    for row in rows[1:]:
        assert all(label in [str(d) for d in range(10)] for label in row[1::2])  # the digits' names
        scores = [float(s) for s in row[2::2]]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1.0001
    warnings = [line for line in out.stderr.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "broken.jpg" in warnings[0], out.stderr
    assert "README" not in out.stderr
    assert "predicted 4 images (1 unreadable, skipped)" in out.stdout
    again = _predict([str(run_dir), str(folder), "--out", str(tmp_path / "out")], tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert _predict([str(run_dir), str(folder), "--out", str(tmp_path / "out"), "--overwrite"], tmp_path).returncode == 0


def test_segmentation_writes_label_maps_at_each_images_size(tmp_path):
    config = variant("tiny", image_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2)
    model = build_model(config, "segmentation", {"num_classes": 5, "channels": 16, "auxiliary_channels": 8,
                                                 "block_indices": [0, 1, 2, 3]})
    checkpoint = save_checkpoint(model, tmp_path / "seg")
    images = tmp_path / "scenes"
    images.mkdir()
    Image.new("RGB", (40, 30), (10, 200, 30)).save(images / "wide.png")
    Image.new("RGB", (20, 50), (200, 10, 30)).save(images / "tall.jpg")
    out = _predict([str(checkpoint), str(images / "*"), "--out", str(tmp_path / "maps")], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    for stem, size in (("scenes__wide", (40, 30)), ("scenes__tall", (20, 50))):
        labels = Image.open(tmp_path / "maps" / f"{stem}.labels.png")
        assert labels.size == size and labels.mode == "L" and np.asarray(labels).max() < 5
        assert Image.open(tmp_path / "maps" / f"{stem}.overlay.png").size == size


def test_refusals_are_one_line_with_exit_2(tmp_path):
    mim = build_model(variant("tiny", image_size=32, depth=2), "mim", {"vocab_size": 16})
    checkpoint = save_checkpoint(mim, tmp_path / "mim")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png")
    for args, message in ((["mim", "x.png"], "predicts nothing to write"),
                          (["mim", "nothing/*.png"], "no images found"),
                          ([str(tmp_path / "absent"), "x.png"], "no such file or directory")):
        out = _predict(args if args[0] != "mim" else [str(checkpoint), *args[1:]], tmp_path)
        assert out.returncode == 2, out.stderr
        lines = [line for line in out.stderr.strip().splitlines() if "WARNING" not in line]
        assert len(lines) == 1 and message in lines[0], out.stderr
