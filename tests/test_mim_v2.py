"""BEiT v2's pretraining head (`mim_v2`): the patch-aggregation branch computed by hand, the summed
loss, unilm beit2 pretraining checkpoints (hand-built with unilm's key names) loading as this head,
and v2 pretraining on 2 gloo ranks under ZeRO-2 and ZeRO-3 with an exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

import beitdist
from beitdist.backbone.config import BackboneConfig
from beitdist.model import build_model
from beitdist.schema import OptionsError
from tests.distributed import TINY_RECIPE, merge, result_of, run_recipe

CONFIG = BackboneConfig(embed_dim=32, depth=4, num_heads=4, image_size=(32, 32), patch_size=8, rel_pos_bias="shared",
                        layer_scale_init=0.1, use_mask_token=True, pooling="none")
OPTIONS = {"vocab_size": 24, "early_layers": 2}


def _model(**options):
    torch.manual_seed(0)
    return build_model(CONFIG, "mim_v2", {**OPTIONS, **options}).eval()


def _inputs(batch=3):
    gen = torch.Generator().manual_seed(1)
    pixels = torch.randn(batch, 3, 32, 32, generator=gen)
    mask = torch.rand(batch, 16, generator=gen) < 0.4
    mask[:, 0] = True
    labels = torch.randint(0, 24, (batch, 16), generator=gen)
    return pixels, mask, labels


def test_both_branches_match_a_hand_computation():
    model = _model()
    pixels, mask, _ = _inputs()
    with torch.no_grad():
        out = model(pixels, mask)
        states = model.backbone(pixels, mask, output_hidden_states=True).hidden_states
        head, bias = model.head, model.backbone.shared_bias()
        x = torch.cat([states[-1][:, :1], states[2][:, 1:]], dim=1)  # the last CLS, block 2's patches
        for block in head.cls_pt_layers:
            x = block(x, bias)
        expected_mim = head.lm_head(head.norm(states[-1][:, 1:]))
        expected_cls_pt = head.lm_head(head.norm(x[:, 1:]))  # shared norm and lm_head
    assert out.logits.shape == out.aux_logits.shape == (3, 16, 24)
    torch.testing.assert_close(out.logits, expected_mim, atol=1e-6, rtol=0)
    torch.testing.assert_close(out.aux_logits, expected_cls_pt, atol=1e-6, rtol=0)
    assert len(head.cls_pt_layers) == 2


def test_loss_is_the_sum_of_both_cross_entropies_and_reaches_the_early_blocks():
    model = _model().train()
    for module in model.modules():  # no dropout / drop path: train and eval outputs comparable
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    pixels, mask, labels = _inputs()
    out = model(pixels, mask)
    assert out.logits.shape == (int(mask.sum()), 24)  # training mode: the masked patches only
    loss = model.loss(out, {"bool_masked_pos": mask, "labels": labels})
    expected = F.cross_entropy(out.logits, labels[mask]) + F.cross_entropy(out.aux_logits, labels[mask])
    torch.testing.assert_close(loss, expected)
    # the aggregation branch alone sends gradient into the early blocks through its patch tokens
    F.cross_entropy(out.aux_logits, labels[mask]).backward()
    assert model.backbone.blocks[1].mlp.fc2.weight.grad.abs().sum() > 0
    assert model.backbone.blocks[3].mlp.fc2.weight.grad.abs().sum() > 0  # and the late ones via the CLS token


def test_an_unshared_lm_head_and_bad_options():
    model = _model(shared_lm_head=False)
    assert model.head.cls_pt_lm_head is not None and model.head.cls_pt_norm is not None
    with pytest.raises(OptionsError, match="early_layers: block 9 does not exist in a backbone of depth 4"):
        build_model(CONFIG, "mim_v2", {"early_layers": 9})


def _unilm_state(model):
    """A unilm beit2 pretraining checkpoint (VisionTransformerForMaskedImageModelingCLS) built by
    hand: unilm's module names, its relative_position_index buffers, wrapped in {"model": ...}."""
    state = {}
    for key, value in model.state_dict().items():
        state[key.removeprefix("backbone.").removeprefix("head.")] = value.clone()
    state["rel_pos_bias.relative_position_index"] = torch.zeros(17 * 1, dtype=torch.long)
    return {"model": state}


def test_a_unilm_beit2_pretraining_checkpoint_loads_as_the_v2_head(tmp_path):
    model = _model()
    path = tmp_path / "beitv2_pretrain.pth"
    torch.save(_unilm_state(model), path)
    assert "cls_pt_layers.0.attn.qkv.weight" in torch.load(path)["model"]
    # the weights do not say which block the stack reads (unilm's --early_layers): the option does
    loaded = beitdist.load_model(path, head="auto", head_options={"early_layers": 2})
    assert loaded.head_name == "mim_v2"
    assert loaded.head.options()["vocab_size"] == 24 and loaded.head.options()["head_layers"] == 2
    pixels, mask, _ = _inputs()
    with torch.no_grad():
        a, b = model(pixels, mask), loaded(pixels, mask)
    torch.testing.assert_close(b.logits, a.logits, atol=1e-6, rtol=0)
    torch.testing.assert_close(b.aux_logits, a.aux_logits, atol=1e-6, rtol=0)
    # fine-tuning starts from its backbone: the pretraining head is replaced (and said so)
    fine = beitdist.load_model(path, head="classification", head_options={"num_classes": 10},
                               rel_pos_bias="per_block")
    assert fine.head_name == "classification"
    torch.testing.assert_close(fine.backbone.blocks[0].attn.qkv.weight, model.backbone.blocks[0].attn.qkv.weight)
    # a v1 pretraining checkpoint (lm_head without the stack) is still v1's
    v1 = {k: v for k, v in _unilm_state(model)["model"].items() if not k.startswith("cls_pt_layers.")}
    torch.save({"model": v1}, tmp_path / "beit_v1.pth")
    assert beitdist.load_model(tmp_path / "beit_v1.pth", head="auto").head_name == "mim"


@pytest.fixture(scope="module")
def codebook(tmp_path_factory):
    from beitdist.tokenizers.fit import fit_codebook, load_digits_images

    images, _ = load_digits_images(32)
    return fit_codebook(images[:400], tmp_path_factory.mktemp("cb") / "digits32.safetensors", vocab_size=32,
                        patch_size=8, input_size=32, seed=0)


def _v2_recipe(codebook, stage):
    recipe = merge(TINY_RECIPE, {
        "name": f"v2_zero{stage}",
        "model": {"backbone": {"embed_dim": 32, "depth": 4, "num_heads": 2, "image_size": 32, "patch_size": 8,
                               "rel_pos_bias": "shared", "layer_scale_init": 0.1}},
        "tokenizer": {"name": "codebook", "options": {"path": str(codebook)}},
        "data": {"mask_ratio": 0.4},
        "engine": {"zero_stage": stage},
        "train": {"steps": 6, "checkpoint_every": 3, "eval_every": 6},
    })
    recipe["head"] = {"name": "mim_v2", "options": {"vocab_size": 32, "early_layers": 2}}
    return recipe


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_v2_pretraining_on_two_ranks_resumes_exactly(codebook, stage, tmp_path):
    whole = _v2_recipe(codebook, stage)
    run_recipe(whole, tmp_path)
    interrupted = merge(whole, {"name": f"{whole['name']}_cut", "train": {"stop_at": 3}})
    run_recipe(interrupted, tmp_path)
    resumed = merge(whole, {"name": interrupted["name"]})
    out = run_recipe(resumed, tmp_path)
    assert "resumed from step_3 at step 3" in out.stderr
    a, b = result_of(whole, tmp_path), result_of(resumed, tmp_path)
    assert b["losses"] == pytest.approx(a["losses"][3:], abs=1e-6)
    metrics = a["metrics"]
    assert 0 <= metrics["val_mim_accuracy"] <= 1 and 0 <= metrics["val_cls_pt_accuracy"] <= 1
    assert all(loss == loss for loss in a["losses"])  # finite (NaN != NaN)
    final = beitdist.load_model(tmp_path / "runs" / whole["name"] / "final", head="auto")
    assert final.head_name == "mim_v2" and final.head.early_layers == 2
    saved = json.loads((tmp_path / "runs" / whole["name"] / "final" / "beitdist_config.json").read_text())
    assert saved["head"] == "mim_v2"
    if stage == 2:  # a pretraining run has no class head: its features are judged by k-NN
        from beitdist.cli import main

        assert main(["evaluate", str(tmp_path / "runs" / whole["name"]), "--knn"]) == 0
        knn = json.loads((tmp_path / "runs" / whole["name"] / "eval" / "representation.json").read_text())
        assert 0.1 < knn["metrics"]["knn_top1"] <= 1.0  # 10 digits: well above chance even untrained


def test_the_aggregation_stack_follows_the_backbone_weight_decay_rules():
    from beitdist.optim import OptimConfig, param_groups

    per_block = CONFIG.replace(rel_pos_bias="per_block")
    model = build_model(per_block, "mim_v2", OPTIONS)
    groups = param_groups(model, OptimConfig(lr=1e-3, weight_decay=0.05))
    decayed = {n for g in groups if g["apply_wd"] for n in g["names"]}
    assert "head.cls_pt_layers.0.attn.qkv.weight" in decayed
    assert "head.cls_pt_layers.0.attn.relative_position_bias_table" not in decayed
    assert "backbone.blocks.0.attn.relative_position_bias_table" not in decayed
    head_ids = {g["layer_id"] for g in groups if any(n.startswith("head.") for n in g["names"])}
    assert head_ids == {model.backbone.num_layer_ids - 1}  # the head's blocks learn at the full rate
