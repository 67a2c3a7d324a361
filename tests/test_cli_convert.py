"""`beitdist convert`: any checkpoint in, transformers or beitdist out; bad input exits 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import beitdist
from beitdist.cli import main


def _model():
    config = beitdist.BackboneConfig(embed_dim=32, depth=2, num_heads=4, image_size=32, patch_size=8)
    return beitdist.build_model(config, "classification", {"num_classes": 3}).eval()


def test_convert_beitdist_to_hf_and_back(tmp_path, capsys):
    model = _model()
    beitdist.save_checkpoint(model, tmp_path / "ckpt")
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "hf"), "--to", "hf", "--head", "classification"]) == 0
    assert "wrote hf checkpoint" in capsys.readouterr().out
    assert (tmp_path / "hf" / "config.json").exists()
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "back"), "--to", "beitdist", "--head", "classification"]) == 0
    again = beitdist.load_model(tmp_path / "back", head="classification").eval()
    pixels = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again(pixels).logits, model(pixels).logits)


def test_convert_with_new_resolution(tmp_path):
    beitdist.save_checkpoint(_model(), tmp_path / "ckpt")
    assert main(["convert", str(tmp_path / "ckpt"), str(tmp_path / "big"), "--to", "beitdist", "--image-size", "64"]) == 0
    assert beitdist.load_model(tmp_path / "big").config.image_size == (64, 64)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["convert", "/no/such/file.pth", "out"], "no such file or directory"),
        (["convert", "{ckpt}", "out", "--image-size", "30"], "multiple of patch_size"),
    ],
)
def test_bad_input_exits_2_with_one_line(tmp_path, args, message):
    beitdist.save_checkpoint(_model(), tmp_path / "ckpt")
    args = [a.replace("{ckpt}", str(tmp_path / "ckpt")) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "beitdist", *args], capture_output=True, text=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
