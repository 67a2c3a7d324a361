"""Bad checkpoints fail with one clear CheckpointError naming keys and shapes; nothing half-loads."""

from __future__ import annotations

import os

import pytest
import torch

import beitdist
from beitdist import CheckpointError


class Gadget:
    """An arbitrary class: unpickling it needs weights_only=False."""

    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def _unilm_state(tmp_path, **config):
    cfg = beitdist.BackboneConfig(embed_dim=32, depth=2, num_heads=4, image_size=32, patch_size=8, **config)
    model = beitdist.build_model(cfg, "classification", {"num_classes": 3})
    state = {k.removeprefix("backbone."): v for k, v in model.state_dict().items()}
    state["head.weight"] = state.pop("head.classifier.weight")
    state["head.bias"] = state.pop("head.classifier.bias")
    return model, state


def test_wrong_shape_is_named_with_both_shapes(tmp_path):
    _, state = _unilm_state(tmp_path)
    state["blocks.1.mlp.fc1.weight"] = torch.zeros(100, 32)
    torch.save({"model": state}, tmp_path / "bad.pth")
    with pytest.raises(CheckpointError) as err:
        beitdist.load_model(tmp_path / "bad.pth", head="classification", mlp_dim=128)
    assert "backbone.blocks.1.mlp.fc1.weight: checkpoint (100, 32) vs model (128, 32)" in str(err.value)
    assert "nothing was loaded" in str(err.value)


def test_missing_key_is_named(tmp_path):
    _, state = _unilm_state(tmp_path)
    del state["blocks.1.norm1.weight"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing keys \['backbone.blocks.1.norm1.weight'\]"):
        beitdist.load_model(tmp_path / "missing.pth", head="classification")


def test_unexpected_key_is_named(tmp_path):
    _, state = _unilm_state(tmp_path)
    state["blocks.0.attn.mystery"] = torch.zeros(3)
    torch.save(state, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected keys \['backbone.blocks.0.attn.mystery'\]"):
        beitdist.load_model(tmp_path / "extra.pth", head="classification")


def test_unknown_layout(tmp_path):
    torch.save({"encoder_weights": torch.zeros(3), "other": torch.ones(2)}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unknown checkpoint layout"):
        beitdist.load_model(tmp_path / "other.pt")


def test_arbitrary_pickle_is_refused_until_trusted(tmp_path):
    model, state = _unilm_state(tmp_path)
    torch.save({"model": state, "gadget": Gadget()}, tmp_path / "pickled.pth")
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        beitdist.load_model(tmp_path / "pickled.pth", head="classification")
    loaded = beitdist.load_model(tmp_path / "pickled.pth", head="classification", trust_pickle=True)
    pixels = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded.eval()(pixels).logits, model.eval()(pixels).logits)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", b"PK\x03\x04broken zip"])
def test_unreadable_files(tmp_path, content):
    (tmp_path / "junk.pth").write_bytes(content)
    with pytest.raises(CheckpointError, match="junk.pth"):
        beitdist.load_model(tmp_path / "junk.pth")


def test_missing_path_and_empty_directory(tmp_path):
    with pytest.raises(CheckpointError, match="no such file or directory"):
        beitdist.load_model(tmp_path / "nowhere.pth")
    with pytest.raises(CheckpointError, match="neither a beitdist checkpoint"):
        beitdist.load_model(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        beitdist.load_model(tmp_path)


def test_incompatible_rel_pos_change(tmp_path):
    model, _ = _unilm_state(tmp_path)
    beitdist.save_checkpoint(model, tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="'per_block' in the checkpoint cannot become 'shared'"):
        beitdist.load_model(tmp_path / "ckpt", rel_pos_bias="shared")
    with pytest.raises(CheckpointError, match="unknown field"):
        beitdist.load_model(tmp_path / "ckpt", image_sise=64)


def test_save_checkpoint_round_trip_and_atomic_overwrite(tmp_path):
    model, _ = _unilm_state(tmp_path, rel_pos_bias="shared", use_mask_token=True)
    out = tmp_path / "run" / "final"
    beitdist.save_checkpoint(model, out)
    beitdist.save_checkpoint(model, out, overwrite=True)  # swapped in whole
    assert sorted(os.listdir(out.parent)) == ["final"]
    loaded = beitdist.load_model(out, head="classification").eval()
    assert loaded.config == model.config and loaded.head.options() == model.head.options()
    pixels = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(pixels).logits, model.eval()(pixels).logits, atol=0, rtol=0)


def test_failed_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    model, _ = _unilm_state(tmp_path)
    out = tmp_path / "final"
    beitdist.save_checkpoint(model, out)
    before = (out / "model.safetensors").read_bytes()

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("beitdist.checkpoint.save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        beitdist.save_checkpoint(model, out, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["final"]


def _corrupt_files(tmp_path):
    model, _ = _unilm_state(tmp_path)
    beitdist.save_checkpoint(model, tmp_path / "native")
    weights = (tmp_path / "native" / "model.safetensors").read_bytes()
    (tmp_path / "native" / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp_path / "half.safetensors").write_bytes(weights[: len(weights) // 2])
    (tmp_path / "random.pth").write_bytes(os.urandom(4096))
    torch.save(model.state_dict(), tmp_path / "whole.pth")
    (tmp_path / "truncated.pth").write_bytes((tmp_path / "whole.pth").read_bytes()[:3000])
    return ["native", "half.safetensors", "random.pth", "truncated.pth"]


def test_corrupt_files_are_checkpoint_errors_with_or_without_trust_pickle(tmp_path):
    for name in _corrupt_files(tmp_path):
        for trust in (False, True):
            with pytest.raises(CheckpointError, match="corrupt or not a checkpoint") as caught:
                beitdist.load_model(tmp_path / name, trust_pickle=trust)
            assert "trust_pickle" not in str(caught.value), name  # trusting would not help


def test_corrupt_checkpoint_through_the_cli_is_one_line(tmp_path, capsys):
    from beitdist.cli import main

    for name in _corrupt_files(tmp_path):
        for extra in ([], ["--trust-pickle"]):
            assert main(["convert", str(tmp_path / name), str(tmp_path / "out"), *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and "corrupt or not a checkpoint" in err[0], err
    assert not (tmp_path / "out").exists()
