"""The encoder on its own: BEiT's init, layer ids, masking, intermediates, checkpointing, errors."""

from __future__ import annotations

import math

import pytest
import torch

import beitdist
from beitdist.backbone import BackboneConfig, Beit, ConfigError, InputError, variant


def tiny(**overrides) -> BackboneConfig:
    base = dict(embed_dim=32, depth=4, num_heads=4, image_size=32, patch_size=8, drop_path_rate=0.0)
    base.update(overrides)
    return BackboneConfig(**base)


@pytest.mark.parametrize(("name", "millions"), [("base", 86.5), ("large", 304.4)])
def test_published_parameter_counts(name, millions):
    with torch.device("meta"):
        model = beitdist.build_model(variant(name), "classification", {"num_classes": 1000})
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 1) == millions


def test_variants_match_the_paper():
    base, large = variant("base"), variant("large")
    assert (base.embed_dim, base.depth, base.num_heads, base.hidden_mlp_dim) == (768, 12, 12, 3072)
    assert (large.embed_dim, large.depth, large.num_heads, large.layer_scale_init) == (1024, 24, 16, 1e-5)
    assert base.layer_norm_eps == 1e-6 and base.grid_size == (14, 14)
    assert variant("huge").depth == 32


def test_init_rescales_each_block_by_its_depth():
    torch.manual_seed(0)
    model = Beit(BackboneConfig(embed_dim=256, depth=4, num_heads=4, image_size=32, patch_size=8))
    for layer_id, block in enumerate(model.blocks, start=1):
        expected = 0.02 / math.sqrt(2 * layer_id)
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            assert abs(weight.std().item() / expected - 1) < 0.05
        assert abs(block.attn.qkv.weight.std().item() / 0.02 - 1) < 0.05
        assert torch.all(block.gamma_1 == 0.1) and torch.all(block.attn.q_bias == 0)
        assert torch.all(block.attn.relative_position_bias_table == 0)
    head = beitdist.build_model(tiny(embed_dim=256), "classification", {"num_classes": 1000}).head.classifier
    assert abs(head.weight.std().item() / (0.02 * 0.001) - 1) < 0.05


def test_layer_ids_and_no_weight_decay():
    model = Beit(tiny(rel_pos_bias="shared", abs_pos_emb=True, use_mask_token=True))
    ids = {name: model.layer_id(name) for name, _ in model.named_parameters()}
    assert ids["cls_token"] == ids["mask_token"] == ids["pos_embed"] == ids["patch_embed.proj.weight"] == 0
    assert ids["blocks.0.attn.qkv.weight"] == 1 and ids["blocks.3.mlp.fc2.bias"] == 4
    assert ids["rel_pos_bias.relative_position_bias_table"] == ids["fc_norm.weight"] == 5 == model.num_layer_ids - 1
    assert model.no_weight_decay() == {"cls_token", "pos_embed", "rel_pos_bias.relative_position_bias_table"}
    assert "blocks.0.attn.relative_position_bias_table" in Beit(tiny()).no_weight_decay()
    assert Beit(tiny()).no_weight_decay(rel_pos_tables=False) == {"cls_token"}


def test_mask_token_replaces_masked_patches_only():
    model = Beit(tiny(use_mask_token=True)).eval()
    pixels = torch.randn(2, 3, 32, 32)
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5]] = True
    plain, masked = model.embed(pixels), model.embed(pixels, mask)
    torch.testing.assert_close(masked[0, 2], model.mask_token[0, 0])
    torch.testing.assert_close(masked[0, 6], model.mask_token[0, 0])
    torch.testing.assert_close(masked[1], plain[1])
    torch.testing.assert_close(masked[0, 3], plain[0, 3])


@pytest.mark.parametrize("rel_pos_bias", ["shared", "per_block", "none"])
def test_forward_intermediates_are_the_block_outputs(rel_pos_bias):
    model = Beit(tiny(rel_pos_bias=rel_pos_bias, abs_pos_emb=rel_pos_bias == "none")).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        states = model(pixels, output_hidden_states=True).hidden_states
        maps = model.forward_intermediates(pixels, [0, 2, -1])
        tokens = model.forward_intermediates(pixels, [1], output_fmt="NLC")
    assert [m.shape for m in maps] == [(2, 32, 4, 4)] * 3
    for m, index in zip(maps, [0, 2, 3]):
        expected = states[index + 1][:, 1:].transpose(1, 2).reshape(2, 32, 4, 4)
        torch.testing.assert_close(m, expected)
    # patch (row 1, col 2) is token 1 + 1 * 4 + 2
    torch.testing.assert_close(maps[0][:, :, 1, 2], states[1][:, 7])
    torch.testing.assert_close(tokens[0], states[2])
    with pytest.raises(InputError, match="out of range"):
        model.forward_intermediates(pixels, [4])


def test_grad_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = beitdist.build_model(tiny(), "classification", {"num_classes": 3})
    pixels, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    grads = []
    for enable in (False, True):
        model.zero_grad()
        model.backbone.set_grad_checkpointing(enable)
        loss = torch.nn.functional.cross_entropy(model(pixels).logits, labels)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def test_drop_path_is_random_in_training_only():
    model = Beit(tiny(drop_path_rate=0.5)).train()
    pixels = torch.randn(8, 3, 32, 32)
    torch.manual_seed(1)
    a = model(pixels).last_hidden_state
    torch.manual_seed(2)
    b = model(pixels).last_hidden_state
    assert (a - b).abs().max() > 1e-4
    model.eval()
    torch.testing.assert_close(model(pixels).last_hidden_state, model(pixels).last_hidden_state)


def test_bf16_autocast_runs_and_stays_close():
    model = beitdist.build_model(tiny(), "classification", {"num_classes": 3}).eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        fp32 = model(pixels).logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = model(pixels).logits
    assert bf16.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.float(), fp32, atol=2e-2, rtol=0)


def test_bad_inputs_name_what_was_expected():
    model = Beit(tiny())
    with pytest.raises(InputError, match=r"expected shape \(B, 3, 32, 32\), got \(2, 3, 64, 64\)"):
        model(torch.randn(2, 3, 64, 64))
    with pytest.raises(InputError, match="no mask token"):
        model(torch.randn(2, 3, 32, 32), torch.zeros(2, 16, dtype=torch.bool))
    with pytest.raises(InputError, match=r"bool_masked_pos: expected shape \(2, 16\)"):
        Beit(tiny(use_mask_token=True))(torch.randn(2, 3, 32, 32), torch.zeros(2, 15, dtype=torch.bool))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_heads=5), "not divisible by num_heads"),
        (dict(image_size=30), "multiple of patch_size"),
        (dict(pooling="max"), "pooling: got 'max'; allowed: mean, cls, none"),
        (dict(rel_pos_bias="global"), "allowed: shared, per_block, none"),
        (dict(drop_path_rate=1.5), r"drop_path_rate: expected a value in \[0, 1\)"),
        (dict(depth=0), "depth: expected a positive int"),
    ],
)
def test_bad_configs_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        tiny(**overrides)


def test_unknown_variant_lists_the_known_ones():
    with pytest.raises(ConfigError, match="allowed: tiny, small, base, large, huge"):
        variant("gigantic")


def test_head_needing_a_mask_token_gets_one():
    model = beitdist.build_model(tiny(), "mim", {"vocab_size": 20}).eval()
    assert model.config.use_mask_token and model.config.pooling == "none"
    out = model(torch.randn(2, 3, 32, 32), torch.rand(2, 16) < 0.5)
    assert out.logits.shape == (2, 16, 20)


def test_mim_training_projects_only_the_masked_patches():
    """In training mode the MIM head returns the masked patches' logits only (as unilm's
    pretraining does), and the loss, metrics and gradients equal those of the all-patch logits."""
    torch.manual_seed(0)
    model = beitdist.build_model(tiny(), "mim", {"vocab_size": 20})
    pixels = torch.randn(3, 3, 32, 32)
    mask = torch.zeros(3, 16, dtype=torch.bool)
    mask[0, :5] = mask[1, 7:] = True  # 5, 9 and 0 masked patches
    batch = {"bool_masked_pos": mask, "labels": torch.randint(0, 20, (3, 16))}

    def loss_and_grads(train_mode: bool):
        model.train(train_mode)
        model.zero_grad()
        out = model(pixels, mask)
        loss = model.head.loss(out, batch)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out.logits, loss, model.head.metric_state(out, batch), grads

    masked_logits, masked_loss, masked_state, masked_grads = loss_and_grads(True)
    all_logits, all_loss, all_state, all_grads = loss_and_grads(False)
    assert masked_logits.shape == (14, 20) and all_logits.shape == (3, 16, 20)
    torch.testing.assert_close(masked_logits, all_logits[mask])
    torch.testing.assert_close(masked_loss, all_loss)
    assert masked_state == all_state and float(masked_state["count"]) == 14
    assert masked_grads.keys() == all_grads.keys() and "head.lm_head.weight" in masked_grads
    for name, grad in masked_grads.items():
        torch.testing.assert_close(grad, all_grads[name], msg=name)

    model.train()  # nothing masked: a zero loss that still reaches the head's weights
    empty = {"bool_masked_pos": torch.zeros(3, 16, dtype=torch.bool), "labels": batch["labels"]}
    out = model(pixels, empty["bool_masked_pos"])
    loss = model.head.loss(out, empty)
    loss.backward()
    assert out.logits.shape == (0, 20) and loss.item() == 0.0


def _naive_bias(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    n = index.shape[0]
    return table[index.view(-1)].view(n, n, -1).permute(2, 0, 1)


def test_gathered_bias_is_sdpa_aligned_and_exact():
    """The bias is a view into storage padded to BIAS_ALIGNMENT (CUDA's memory-efficient SDPA takes it
    without copying), equal to the plain gather in value and gradient, also when cast first."""
    from beitdist.backbone.layers import (BIAS_ALIGNMENT, gather_relative_position_bias, num_relative_distances,
                                          relative_position_index)

    grid = (14, 14)
    index = relative_position_index(grid)
    table = torch.randn(num_relative_distances(grid), 12, requires_grad=True)
    bias = gather_relative_position_bias(table, index)
    assert bias.shape == (12, 197, 197)
    assert all(stride % BIAS_ALIGNMENT == 0 for stride in bias.stride()[:-1]) and bias.stride(-1) == 1
    expected = _naive_bias(table, index)
    torch.testing.assert_close(bias, expected, rtol=0, atol=0)
    weights = torch.randn(12, 197, 197)
    (grad,) = torch.autograd.grad((bias * weights).sum(), table)
    (expected_grad,) = torch.autograd.grad((expected * weights).sum(), table)
    torch.testing.assert_close(grad, expected_grad)
    cast = gather_relative_position_bias(table, index, torch.bfloat16)
    assert cast.dtype == torch.bfloat16 and cast.stride() == bias.stride()


def test_gathered_bias_is_cached_only_without_a_graph():
    from beitdist.backbone.layers import RelativePositionBias

    module = RelativePositionBias((4, 4), 2)
    with torch.no_grad():
        first, again = module(), module()
        assert again is first  # inference reuses the gathered bias
        module.relative_position_bias_table.add_(1.0)  # an optimizer step (or load) changes the table
        changed = module()
        assert changed is not first
        torch.testing.assert_close(changed, first + 1.0)
    trained = module()
    assert trained.requires_grad and trained is not changed


def _model_with_random_bias_tables(rel_pos_bias: str) -> Beit:
    """A tiny BEiT whose relative-position tables are not zero (as initialised), so the bias matters."""
    config = variant("tiny", image_size=32, patch_size=8, depth=2, rel_pos_bias=rel_pos_bias, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = Beit(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "relative_position_bias_table" in name:
                param.normal_()
    return model


@pytest.mark.parametrize("rel_pos_bias", ["shared", "per_block"])
def test_cpu_inference_attention_matches_the_training_path(rel_pos_bias):
    """In eval mode the CPU path is SDPA with the bias expanded to 4-D (its fused kernel); in
    training mode two matmuls (fp32) or SDPA with the 3-D bias (bf16): the same numbers either
    way (no dropout here), with or without a graph being built."""
    model = _model_with_random_bias_tables(rel_pos_bias)
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        for dtype, tolerance in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                trained = model.train()(x).last_hidden_state
                evaluated = model.eval()(x).last_hidden_state
                with torch.inference_mode():
                    inferred = model(x).last_hidden_state
            assert trained.requires_grad and evaluated.requires_grad and not inferred.requires_grad
            for out in (evaluated, inferred):
                torch.testing.assert_close(out.detach().float(), trained.detach().float(), atol=tolerance,
                                           rtol=tolerance)


@pytest.mark.parametrize("rel_pos_bias", ["shared", "per_block"])
def test_cpu_attention_matches_sdpa(rel_pos_bias):
    """On CPU the scores are computed by two matmuls (faster there); same outputs and gradients as SDPA."""
    import torch.nn.functional as F

    from beitdist.backbone import layers

    model = _model_with_random_bias_tables(rel_pos_bias)
    x = torch.randn(2, 3, 32, 32)
    ours = model(x).last_hidden_state
    grads = torch.autograd.grad(ours.square().sum(), list(model.parameters()), allow_unused=True)
    original = layers.attention
    layers.attention = lambda q, k, v, bias, p, training: F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                                                                          dropout_p=p)
    try:
        reference = model(x).last_hidden_state
        reference_grads = torch.autograd.grad(reference.square().sum(), list(model.parameters()), allow_unused=True)
    finally:
        layers.attention = original
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, reference_grads):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
