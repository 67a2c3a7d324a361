"""unilm and timm checkpoints: built from a transformers model through the documented key mapping
(../shared/REFERENCE.md, "Checkpoint key layouts"), written the way those projects write them, and
compared with the transformers model's outputs."""

from __future__ import annotations

import argparse
import logging
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")

import beitdist  # noqa: E402
from tests.conftest import hf_config, randomize_  # noqa: E402

TOL = 1e-4

BLOCK_MAP = {
    "attention.attention.relative_position_bias.relative_position_bias_table": "attn.relative_position_bias_table",
    "attention.output.dense": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "lambda_1": "gamma_1",
    "lambda_2": "gamma_2",
}
TOP_MAP = {
    "beit.embeddings.cls_token": "cls_token",
    "beit.embeddings.mask_token": "mask_token",
    "beit.embeddings.position_embeddings": "pos_embed",
    "beit.embeddings.patch_embeddings.projection": "patch_embed.proj",
    "beit.encoder.relative_position_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "beit.pooler.layernorm": "fc_norm",
    "beit.layernorm": "norm",
    "classifier": "head",
    "layernorm": "norm",  # the MIM model's final norm, before lm_head
    "lm_head": "lm_head",
}


def hf_to_unilm(model: torch.nn.Module, tmp_path, with_index: bool = True) -> dict[str, torch.Tensor]:
    """transformers on-disk keys -> unilm/timm keys, written out independently of beitdist."""
    from safetensors.torch import load_file

    model.save_pretrained(tmp_path / "hf")
    hf = load_file(str(tmp_path / "hf" / "model.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for key, value in hf.items():
        m = re.match(r"beit\.encoder\.layer\.(\d+)\.(.+)$", key)
        if m:
            i, rest = m.groups()
            if rest.startswith("attention.attention.") and rest.split(".")[2] in ("query", "key", "value"):
                continue
            for src, dst in BLOCK_MAP.items():
                if rest.startswith(src):
                    out[f"blocks.{i}.{dst}{rest[len(src):]}"] = value
            continue
        for src in sorted(TOP_MAP, key=len, reverse=True):
            if key == src or key.startswith(src + "."):
                out[TOP_MAP[src] + key[len(src):]] = value
                break
        else:
            raise AssertionError(f"unmapped key {key}")
    layers = model.config.num_hidden_layers
    for i in range(layers):
        p = f"beit.encoder.layer.{i}.attention.attention."
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([hf[p + "query.weight"], hf[p + "key.weight"], hf[p + "value.weight"]])
        out[f"blocks.{i}.attn.q_bias"] = hf[p + "query.bias"]
        out[f"blocks.{i}.attn.v_bias"] = hf[p + "value.bias"]
        if with_index and f"blocks.{i}.attn.relative_position_bias_table" in out:
            out[f"blocks.{i}.attn.relative_position_index"] = torch.randint(0, 5, (17, 17))
    if with_index and "rel_pos_bias.relative_position_bias_table" in out:
        out["rel_pos_bias.relative_position_index"] = torch.randint(0, 5, (17, 17))
    return out


def _pixels():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(7))


def test_unilm_finetuned_pth_with_args_namespace(tmp_path):
    reference = randomize_(transformers.BeitForImageClassification(hf_config(use_relative_position_bias=True)))
    checkpoint = {
        "model": hf_to_unilm(reference, tmp_path),
        "epoch": 29,
        "args": argparse.Namespace(model="beit_base_patch16_224", layer_decay=0.65),
    }
    torch.save(checkpoint, tmp_path / "checkpoint-best.pth")
    model = beitdist.load_model(tmp_path / "checkpoint-best.pth", head="classification").eval()
    assert model.config.layer_norm_eps == 1e-6 and model.config.num_heads == 4
    with torch.no_grad():
        torch.testing.assert_close(model(_pixels()).logits, reference(_pixels()).logits, atol=TOL, rtol=0)


def test_timm_state_dict_with_index_buffers(tmp_path):
    reference = randomize_(
        transformers.BeitForImageClassification(hf_config(use_relative_position_bias=True, use_mean_pooling=False))
    )
    torch.save(hf_to_unilm(reference, tmp_path), tmp_path / "timm.pth")
    model = beitdist.load_model(tmp_path / "timm.pth", head="classification").eval()
    assert model.config.pooling == "cls"
    with torch.no_grad():
        torch.testing.assert_close(model(_pixels()).logits, reference(_pixels()).logits, atol=TOL, rtol=0)


def _pretrain_checkpoint(tmp_path):
    reference = randomize_(
        transformers.BeitForMaskedImageModeling(hf_config(use_mask_token=True, use_shared_relative_position_bias=True))
    )
    torch.save({"model": hf_to_unilm(reference, tmp_path)}, tmp_path / "beit_pt.pth")
    return reference, tmp_path / "beit_pt.pth"


def test_unilm_pretraining_checkpoint_as_mim(tmp_path):
    reference, path = _pretrain_checkpoint(tmp_path)
    model = beitdist.load_model(path, head="mim").eval()
    assert model.config.rel_pos_bias == "shared" and model.config.pooling == "none"
    mask = torch.rand(2, 16, generator=torch.Generator().manual_seed(1)) < 0.4
    with torch.no_grad():
        expected = reference(_pixels(), bool_masked_pos=mask).logits
        torch.testing.assert_close(model(_pixels(), bool_masked_pos=mask).logits, expected, atol=TOL, rtol=0)


def test_pretraining_checkpoint_to_finetuning_copies_shared_table(tmp_path, caplog):
    reference, path = _pretrain_checkpoint(tmp_path)
    caplog.set_level(logging.INFO, logger="beitdist")
    model = beitdist.load_model(
        path, head="classification", head_options={"num_classes": 7}, rel_pos_bias="per_block", use_mask_token=False
    )
    shared = reference.state_dict()["beit.shared_position_bias.relative_position_bias_table"]
    for block in model.backbone.blocks:
        torch.testing.assert_close(block.attn.relative_position_bias_table.detach(), shared, atol=0, rtol=0)
    assert model.backbone.rel_pos_bias is None and model.config.pooling == "mean"
    assert model(_pixels()).logits.shape == (2, 7)
    assert "new 'classification' head, freshly initialised" in caplog.text
    assert "the checkpoint's 'mim' head is not loaded" in caplog.text
    assert "copied the shared relative-position table into each of the 3 blocks" in caplog.text
