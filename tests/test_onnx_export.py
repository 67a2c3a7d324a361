"""`beitdist export --to onnx`: the graph equals PyTorch within 1e-4 (classification and
segmentation), the batch axis is dynamic, and outputs follow the no-data-loss rules."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from beitdist import save_checkpoint
from beitdist.backbone.config import variant
from beitdist.model import build_model

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _export(args, cwd):
    return subprocess.run([sys.executable, "-m", "beitdist", "export", *args, "--to", "onnx"], capture_output=True,
                          text=True, cwd=cwd, timeout=300)


CASES = {
    "classification": (variant("tiny", image_size=32, depth=2), {"num_classes": 7}),
    "segmentation": (variant("tiny", image_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2),
                     {"num_classes": 5, "channels": 16, "auxiliary_channels": 8, "block_indices": [0, 1, 2, 3]}),
}


@pytest.mark.parametrize("head", sorted(CASES))
def test_the_onnx_graph_equals_pytorch_at_any_batch_size(tmp_path, head):
    torch.manual_seed(0)
    config, options = CASES[head]
    model = build_model(config, head, options).eval()
    checkpoint = save_checkpoint(model, tmp_path / "ckpt")
    out = _export([str(checkpoint), str(tmp_path / "onnx")], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "max abs diff" in out.stdout and "opset 17" in out.stdout
    session = ort.InferenceSession(str(tmp_path / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 4):
        pixels = torch.randn(batch, 3, 32, 32)
        got = torch.from_numpy(session.run(["logits"], {"pixel_values": pixels.numpy()})[0])
        with torch.no_grad():
            torch.testing.assert_close(got, model(pixels).logits, rtol=0, atol=1e-4)
    record = json.loads((tmp_path / "onnx" / "preprocessing.json").read_text())
    assert record["head"] == head and record["input_shape"] == ["batch", 3, 32, 32]
    assert record["checked"]["max_abs_diff"] <= 1e-4 and record["image_processor"]["size"] == {"height": 32,
                                                                                                "width": 32}


def test_an_existing_export_is_replaced_only_when_asked_and_other_directories_never(tmp_path):
    checkpoint = save_checkpoint(build_model(*CASES["classification"][:1], "classification", {"num_classes": 3}),
                                 tmp_path / "ckpt")
    assert _export([str(checkpoint), str(tmp_path / "onnx")], tmp_path).returncode == 0
    again = _export([str(checkpoint), str(tmp_path / "onnx")], tmp_path)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    assert _export([str(checkpoint), str(tmp_path / "onnx"), "--overwrite"], tmp_path).returncode == 0
    other = _export([str(checkpoint), str(checkpoint)], tmp_path)  # the source itself
    assert other.returncode == 2 and (tmp_path / "ckpt" / "model.safetensors").exists()
