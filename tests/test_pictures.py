"""What MLflow shows of a classification run: the examples captioned with true and predicted
classes, green when right and red when wrong."""

from __future__ import annotations

import numpy as np
import torch

from beitdist.backbone.config import variant
from beitdist.heads.classification import ClassificationHead
from beitdist.model import build_model


def _caption_colours(image, rows: slice) -> set[tuple[int, int, int]]:
    pixels = np.asarray(image)[rows].reshape(-1, 3)
    return {tuple(int(c) for c in p) for p in pixels}


def test_labelled_grid_marks_right_and_wrong_predictions():
    torch.manual_seed(0)
    model = build_model(variant("tiny", image_size=32, depth=2), "classification", {"num_classes": 3}).eval()
    images = torch.randn(3, 3, 32, 32)
    predicted = model(images).logits.argmax(-1)
    labels = predicted.clone()
    labels[1] = (predicted[1] + 1) % 3  # one wrong
    pictures = ClassificationHead.pictures({"pixel_values": images, "labels": labels}, lambda: model)
    grid = pictures["labelled.png"]
    tile = 224  # each 32 px image enlarged 7x
    assert grid.size == (3 * tile, tile + 14)
    caption = slice(tile, tile + 14)
    colours = _caption_colours(grid.crop((0, 0, 2 * tile, grid.height)), caption)
    assert (0, 128, 0) in colours and (200, 0, 0) in colours
    assert (200, 0, 0) not in _caption_colours(grid.crop((0, 0, tile, grid.height)), caption)
    assert "input_0.png" in pictures  # the inputs are still there
    unlabelled = ClassificationHead.pictures({"pixel_values": images, "labels": labels}, lambda: None)
    assert _caption_colours(unlabelled["labelled.png"], caption) <= {(0, 0, 0), (255, 255, 255)}
