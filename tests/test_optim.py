"""Layer-wise lr decay groups, no-weight-decay rules and schedules, against independent computations."""

from __future__ import annotations

import math

import pytest
import torch

import beitdist
from beitdist.optim import OptimConfig, Schedule, apply_schedule, build_adamw, param_groups
from beitdist.schema import OptionsError, parse

CONFIG = beitdist.BackboneConfig(embed_dim=32, depth=4, num_heads=4, image_size=32, patch_size=8, abs_pos_emb=True)


def expected_layer_id(name: str, depth: int) -> int:
    """unilm's get_num_layer_for_vit, restated."""
    name = name.removeprefix("backbone.")
    if name in ("cls_token", "mask_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def test_every_group_lr_is_base_times_decay_power():
    model = beitdist.build_model(CONFIG, "classification", {"num_classes": 5})
    config = OptimConfig(lr=2e-3, layer_decay=0.65)
    groups = param_groups(model, config)
    seen = set()
    for group in groups:
        for name in group["names"]:
            layer = expected_layer_id(name, CONFIG.depth)
            assert group["lr"] == pytest.approx(2e-3 * 0.65 ** (CONFIG.depth + 1 - layer)), name
            seen.add(name)
    assert seen == {n for n, _ in model.named_parameters()}
    optimizer = build_adamw(groups, config)
    apply_schedule(optimizer, Schedule(OptimConfig(lr=2e-3, layer_decay=0.65, schedule="constant"), 10), 5)
    for group, original in zip(optimizer.param_groups, groups):
        assert group["lr"] == pytest.approx(original["lr"])


def test_no_weight_decay_rules():
    model = beitdist.build_model(CONFIG.replace(rel_pos_bias="shared"), "classification", {"num_classes": 5})
    groups = param_groups(model, OptimConfig(weight_decay=0.05))
    decay = {n for g in groups if g["apply_wd"] for n in g["names"]}
    no_decay = {n for g in groups if not g["apply_wd"] for n in g["names"]}
    assert "backbone.cls_token" in no_decay and "backbone.pos_embed" in no_decay
    assert "backbone.rel_pos_bias.relative_position_bias_table" in no_decay
    assert "backbone.blocks.0.norm1.weight" in no_decay and "backbone.blocks.0.attn.q_bias" in no_decay
    assert "backbone.blocks.0.gamma_1" in no_decay and "head.classifier.bias" in no_decay
    assert decay == {n for n, p in model.named_parameters() if p.ndim > 1 and n not in no_decay}
    assert "backbone.blocks.0.attn.qkv.weight" in decay and "head.classifier.weight" in decay
    with_tables = param_groups(model, OptimConfig(rel_pos_weight_decay=True))
    assert "backbone.rel_pos_bias.relative_position_bias_table" in {n for g in with_tables if g["apply_wd"] for n in g["names"]}


def test_cosine_schedule_with_warmup_matches_unilm_formula():
    config = OptimConfig(lr=1e-3, min_lr=1e-5, warmup_steps=10, weight_decay=0.05, weight_decay_end=0.1)
    schedule = Schedule(config, total_steps=110)
    assert schedule.lr(0) == 0.0 and schedule.lr(5) == pytest.approx(5e-4)
    for step in (10, 30, 60, 109):
        expected = 1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * (step - 10) / 100))
        assert schedule.lr(step) == pytest.approx(expected)
    assert schedule.weight_decay(0) == pytest.approx(0.05) and schedule.weight_decay(110) == pytest.approx(0.1)


def test_poly_schedule():
    schedule = Schedule(OptimConfig(lr=3e-5, min_lr=0.0, schedule="poly", warmup_steps=0), total_steps=100)
    assert schedule.lr(0) == pytest.approx(3e-5) and schedule.lr(50) == pytest.approx(1.5e-5) and schedule.lr(100) == 0.0


def test_apply_schedule_sets_weight_decay_only_where_it_applies():
    model = beitdist.build_model(CONFIG, "classification", {"num_classes": 5})
    config = OptimConfig(lr=1e-3, weight_decay=0.05, weight_decay_end=0.5, layer_decay=0.9)
    optimizer = build_adamw(param_groups(model, config), config)
    apply_schedule(optimizer, Schedule(config, 100), 100)
    for group in optimizer.param_groups:
        assert group["weight_decay"] == (pytest.approx(0.5) if group["apply_wd"] else 0.0)


def test_bad_optim_options_name_the_field():
    with pytest.raises(OptionsError, match=r"optim.layer_decay: expected a value in \(0, 1\]"):
        parse(OptimConfig, {"layer_decay": 1.5}, "optim")
    with pytest.raises(OptionsError, match=r"optim.schedule: got 'cosin'; allowed: cosine, poly, constant \(did you mean 'cosine'\?\)"):
        parse(OptimConfig, {"schedule": "cosin"}, "optim")
    assert parse(OptimConfig, {"lr": "1e-3"}, "optim").lr == 1e-3  # YAML reads 1e-3 as a string


def test_zero3_placeholder_shapes_are_respected():
    model = beitdist.build_model(CONFIG, "classification", {"num_classes": 5})
    for p in model.parameters():  # what deepspeed.zero.Init leaves behind
        p.ds_shape = p.shape
        p.data = torch.empty(0)
    groups = param_groups(model, OptimConfig())
    decay = {n for g in groups if g["apply_wd"] for n in g["names"]}
    assert "backbone.blocks.0.attn.qkv.weight" in decay and "backbone.blocks.0.norm1.weight" not in decay
