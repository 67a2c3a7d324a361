"""The segmentation head against transformers' BeitForSemanticSegmentation (random weights), an
mmseg-layout checkpoint built here by an independent key mapping, the metrics on a hand-made
example, batch-1 BatchNorm, sliding-window inference and option errors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch import nn

transformers = pytest.importorskip("transformers")

import beitdist  # noqa: E402
from beitdist import plugins  # noqa: E402
from beitdist.backbone.convert import CheckpointError  # noqa: E402
from beitdist.heads.segmentation import HeadBatchNorm, SegmentationHead, default_block_indices  # noqa: E402
from beitdist.heads.segmentation_eval import slide_inference, whole_inference  # noqa: E402
from beitdist.schema import OptionsError  # noqa: E402
from tests.conftest import hf_config, randomize_, save_hf  # noqa: E402

TOL = 1e-4
MODULE = "beitdist.heads.segmentation"


@pytest.fixture(autouse=True, scope="module")
def _segmentation_registered():
    """Until the module is a declared built-in, register it here (harmless once it is)."""
    with pytest.MonkeyPatch.context() as mp:
        if MODULE not in plugins.BUILTIN_PLUGINS:
            mp.setattr(plugins, "BUILTIN_PLUGINS", (*plugins.BUILTIN_PLUGINS, MODULE))
        plugins.reset()
        yield
    plugins.reset()


def seg_config(**overrides):
    base = dict(num_hidden_layers=5, out_indices=[2, 3, 4, 5], use_relative_position_bias=True, auxiliary_channels=16)
    return hf_config(**{**base, **overrides})


def _pixels(config, batch=2, seed=3):
    size = config.image_size
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _labels(config, batch=2, seed=4):
    size = config.image_size
    labels = torch.randint(0, config.num_labels, (batch, size, size), generator=torch.Generator().manual_seed(seed))
    labels[0, : size // 4] = 255
    return labels


def _reference(config):
    """transformers' logits, auxiliary logits (its output drops them: caught by a hook) and loss."""
    model = randomize_(transformers.BeitForSemanticSegmentation(config))
    caught = {}
    if model.auxiliary_head is not None:
        model.auxiliary_head.register_forward_hook(lambda m, i, out: caught.__setitem__("aux", out))
    return model, caught


CASES = {
    "blocks_0123": dict(),
    "last_block_first": dict(out_indices=[0, 3, 4, 5]),  # 0 -> hidden_states[-1], the last block
    "negative": dict(out_indices=[-4, -3, -2, -1]),
    "shared_img64_p16": dict(use_relative_position_bias=False, use_shared_relative_position_bias=True,
                             image_size=64, patch_size=16),
    "aux_concat_two_convs": dict(auxiliary_concat_input=True, auxiliary_num_convs=2, pool_scales=[1, 2]),
    "no_aux": dict(use_auxiliary_head=False),
    "cls_pooling": dict(use_mean_pooling=False),
}
EXPECTED_BLOCKS = {"last_block_first": (4, 1, 2, 3)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_loss_and_round_trip(case, tmp_path):
    config = seg_config(**CASES[case])
    reference, caught = _reference(config)
    model = beitdist.load_model(save_hf(reference, tmp_path / "hf"), head="segmentation").eval()
    assert model.head.block_indices == EXPECTED_BLOCKS.get(case, (0, 1, 2, 3))
    pixels, labels = _pixels(config), _labels(config)
    with torch.no_grad():
        expected = reference(pixels, labels=labels)
        got = model(pixels)
        loss = model.loss(got, {"labels": labels})
    size = config.image_size // config.patch_size * 4
    assert got.logits.shape == (2, config.num_labels, size, size)
    torch.testing.assert_close(got.logits, expected.logits, atol=TOL, rtol=0)
    if config.use_auxiliary_head:
        torch.testing.assert_close(got.aux_logits, caught["aux"], atol=TOL, rtol=0)
    else:
        assert got.aux_logits is None
    torch.testing.assert_close(loss, expected.loss, atol=1e-5, rtol=1e-5)

    beitdist.export_hf(model, tmp_path / "exported")
    from safetensors.torch import load_file

    before = load_file(str(tmp_path / "hf/model.safetensors"))
    after = load_file(str(tmp_path / "exported/model.safetensors"))
    if case == "cls_pooling":  # its final norm is never used for segmentation: not carried over
        before = {k: v for k, v in before.items() if not k.startswith("beit.layernorm.")}
    assert sorted(before) == sorted(after)
    for key in before:
        torch.testing.assert_close(after[key], before[key], atol=0, rtol=0, msg=key)
    again, info = transformers.BeitForSemanticSegmentation.from_pretrained(
        tmp_path / "exported", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys"), info
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(pixels).logits, got.logits, atol=TOL, rtol=0)


def test_out_index_of_the_embedding_is_refused(tmp_path):
    reference = transformers.BeitForSemanticSegmentation(seg_config(out_indices=[1, 3, 4, 5]))
    with pytest.raises(CheckpointError, match="patch embedding"):
        beitdist.load_model(save_hf(reference, tmp_path / "hf"), head="segmentation")


def _tiny(depth=5, **options):
    config = beitdist.BackboneConfig(embed_dim=32, depth=depth, num_heads=4, image_size=32, patch_size=8,
                                     drop_path_rate=0.0)
    return beitdist.build_model(config, "segmentation", {"num_classes": 4, "auxiliary_channels": 8, **options})


def test_block_indices_defaults_and_export_limits(tmp_path):
    assert default_block_indices(12) == (3, 5, 7, 11)
    assert default_block_indices(24) == (7, 11, 15, 23)
    assert default_block_indices(8) == (1, 3, 5, 7)
    assert _tiny(depth=4).head.block_indices == (0, 1, 2, 3)
    assert _tiny(block_indices=[-5, 1, 2, -2]).head.block_indices == (0, 1, 2, 3)
    # unilm's choice ends at the last block, which transformers can only take as out_index 0 (first)
    with pytest.raises(CheckpointError, match="cannot be expressed in transformers"):
        beitdist.export_hf(_tiny(depth=4), tmp_path / "x")
    beitdist.export_hf(_tiny(block_indices=[0, 1, 2, 3]), tmp_path / "ok")
    assert json.loads((tmp_path / "ok/config.json").read_text())["out_indices"] == [2, 3, 4, 5]


def _mmseg_state(hf_state):
    """transformers on-disk keys -> unilm/mmseg ADE20K keys, written out independently of convert.py."""
    out = {}
    block = {"layernorm_before": "norm1", "layernorm_after": "norm2", "lambda_1": "gamma_1", "lambda_2": "gamma_2",
             "attention.output.dense": "attn.proj", "intermediate.dense": "mlp.fc1", "output.dense": "mlp.fc2",
             "attention.attention.relative_position_bias.relative_position_bias_table":
                 "attn.relative_position_bias_table",
             "attention.attention.relative_position_bias.relative_position_index": "attn.relative_position_index"}
    for key, value in hf_state.items():
        if key.startswith("beit.encoder.layer."):
            _, _, _, index, rest = key.split(".", 4)
            for src, dst in block.items():
                if rest == src or rest.startswith(src + "."):
                    out[f"backbone.blocks.{index}.{dst}{rest[len(src):]}"] = value
            if rest.startswith("attention.attention.") and rest.split(".")[2] in ("query", "key", "value"):
                continue
        elif key == "beit.embeddings.cls_token":
            out["backbone.cls_token"] = value
        elif key.startswith("beit.embeddings.patch_embeddings.projection."):
            out["backbone.patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith(("fpn1.", "fpn2.")):
            out["backbone." + key] = value
        else:
            out[key.replace(".classifier.", ".conv_seg.")] = value
    layers = {k.split(".")[3] for k in hf_state if k.startswith("beit.encoder.layer.")}
    for i in layers:
        prefix = f"beit.encoder.layer.{i}.attention.attention."
        out[f"backbone.blocks.{i}.attn.qkv.weight"] = torch.cat(
            [hf_state[prefix + p + ".weight"] for p in ("query", "key", "value")])
        out[f"backbone.blocks.{i}.attn.q_bias"] = hf_state[prefix + "query.bias"]
        out[f"backbone.blocks.{i}.attn.v_bias"] = hf_state[prefix + "value.bias"]
    return out


def test_mmseg_checkpoint_with_conv_seg_loads(tmp_path):
    from safetensors.torch import load_file

    config = seg_config(auxiliary_concat_input=True)
    reference, _ = _reference(config)
    save_hf(reference, tmp_path / "hf")
    state = _mmseg_state(load_file(str(tmp_path / "hf/model.safetensors")))
    assert "decode_head.conv_seg.weight" in state and "auxiliary_head.conv_seg.weight" in state
    torch.save({"state_dict": state, "meta": {"iter": 160000, "CLASSES": ["a", "b"]}}, tmp_path / "ade.pth")
    # unilm's indices are the 0-based blocks; transformers' [2, 3, 4, 5] are blocks 0..3
    model = beitdist.load_model(tmp_path / "ade.pth", head="segmentation",
                                head_options={"block_indices": [0, 1, 2, 3]}).eval()
    opts = model.head.opts
    assert (opts.num_classes, opts.auxiliary_channels, opts.auxiliary_concat_input) == (5, 16, True)
    pixels = _pixels(config)
    with torch.no_grad():
        torch.testing.assert_close(model(pixels).logits, reference(pixels).logits, atol=TOL, rtol=0)


def test_native_checkpoint_keeps_options(tmp_path):
    model = randomize_(_tiny(block_indices=[1, 2, 3, 4], pool_scales=[1, 3]))
    beitdist.save_checkpoint(model, tmp_path / "ckpt")
    again = beitdist.load_model(tmp_path / "ckpt", head="segmentation").eval()
    assert again.head.block_indices == (1, 2, 3, 4) and again.head.opts.pool_scales == (1, 3)
    pixels = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(again(pixels).logits, model(pixels).logits, atol=0, rtol=0)


def test_miou_on_a_hand_made_example():
    head = SegmentationHead(beitdist.BackboneConfig(embed_dim=32, depth=4, num_heads=4),
                            {"num_classes": 4, "auxiliary_channels": 8})
    labels = torch.tensor([[[0, 0, 1], [1, 2, 255]]])
    pred = torch.tensor([[[0, 1, 1], [1, 1, 0]]])
    logits = nn.functional.one_hot(pred, 4).permute(0, 3, 1, 2).float()
    output = beitdist.ModelOutput(logits, None)
    state = head.metric_state(output, {"labels": labels})
    assert state["area_intersect"].dtype == torch.float64
    assert state["area_intersect"].tolist() == [1, 2, 0, 0]
    assert state["area_union"].tolist() == [2, 4, 1, 0]  # class 3 absent: left out of the mean
    assert state["area_label"].tolist() == [2, 2, 1, 0]
    metrics = head.compute_metrics(state)
    assert metrics == pytest.approx({"mIoU": (0.5 + 0.5 + 0.0) / 3, "mAcc": (0.5 + 1.0 + 0.0) / 3, "aAcc": 3 / 5})
    # states are sums: two batches accumulate to the areas of both
    doubled = {k: v + head.metric_state(output, {"labels": labels})[k] for k, v in state.items()}
    assert head.compute_metrics(doubled) == pytest.approx(metrics)


def test_batch_one_training_step():
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        nn.BatchNorm2d(4).train()(torch.randn(1, 4, 1, 1))  # the failure other implementations hit
    model = _tiny().train()
    ppm_bn = model.head.decode_head.psp_modules[0][1].bn  # pool scale 1: a 1x1 map
    other_bn = model.head.decode_head.bottleneck.bn
    ppm_before, other_before = ppm_bn.running_var.clone(), other_bn.running_var.clone()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    output = model(torch.randn(1, 3, 32, 32))
    loss = model.loss(output, {"labels": torch.randint(0, 4, (1, 32, 32))})
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert ppm_bn.weight.grad is not None and ppm_bn.weight.grad.abs().sum() > 0
    torch.testing.assert_close(ppm_bn.running_var, ppm_before, atol=0, rtol=0)  # nothing to learn from
    assert int(ppm_bn.num_batches_tracked) == 0
    assert not torch.equal(other_bn.running_var, other_before)


def test_all_ignored_batch_gives_zero_loss_not_nan():
    model = _tiny().train()
    output = model(torch.randn(2, 3, 32, 32))
    loss = model.loss(output, {"labels": torch.full((2, 32, 32), 255)})
    loss.backward()
    assert loss.item() == 0.0


def test_single_value_batchnorm_uses_running_statistics():
    bn = randomize_(HeadBatchNorm(4)).train()
    x = torch.randn(1, 4, 1, 1)
    torch.testing.assert_close(bn(x), bn.eval()(x))


def test_sync_batchnorm_on_cpu_falls_back_or_refuses(tmp_path, monkeypatch):
    # torch's own SyncBatchNorm refuses CPU input whenever a process group exists (even of 1 rank)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        x = torch.randn(2, 4, 3, 3)
        with pytest.raises(ValueError, match="GPU"):
            nn.SyncBatchNorm(4).train()(x)
        expected = nn.BatchNorm2d(4).train()(x)
        torch.testing.assert_close(HeadBatchNorm(4, "always").train()(x), expected)  # 1 rank: nothing to sync
        # as seen by one rank of several (spawning real ranks costs seconds of imports per process)
        monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
        torch.testing.assert_close(HeadBatchNorm(4, "auto").train()(x), expected)
        torch.testing.assert_close(HeadBatchNorm(4, "never").train()(x), expected)
        with pytest.raises(RuntimeError, match="only runs on accelerators"):
            HeadBatchNorm(4, "always").train()(x)
        assert HeadBatchNorm(4, "always").eval()(x).shape == x.shape  # eval never syncs
    finally:
        monkeypatch.undo()
        dist.destroy_process_group()


class _PixelEcho(nn.Module):
    """Logits = the first channels of the input at full resolution: each pixel's value does not
    depend on the window, so any correct windowing returns the input itself."""

    def __init__(self, crop):
        super().__init__()
        self.crop, self.seen = crop, []

    def forward(self, x):
        self.seen.append(tuple(x.shape[-2:]))
        return x[:, :2] + 1.0


@pytest.mark.parametrize("size", [(48, 40), (32, 32), (20, 24), (32, 50)])
def test_slide_inference_windows_cover_and_average(size):
    image = torch.randn(2, 3, *size)
    echo = _PixelEcho(32)
    out = slide_inference(echo, image, crop=32, stride=20, num_classes=2)
    torch.testing.assert_close(out, image[:, :2] + 1.0)
    assert set(echo.seen) == {(32, 32)}  # every window (padded if need be) has the model's size


def test_slide_equals_whole_inference_at_crop_size():
    model = randomize_(_tiny())
    image = torch.randn(2, 3, 32, 32)
    whole = whole_inference(model, image)
    assert whole.shape == (2, 4, 32, 32)
    torch.testing.assert_close(slide_inference(model, image, 32, 21, 4), whole, atol=1e-6, rtol=0)
    larger = slide_inference(model, torch.randn(1, 3, 40, 56), 32, 16, 4)
    assert larger.shape == (1, 4, 40, 56) and torch.isfinite(larger).all()


@pytest.mark.parametrize(
    "options, field",
    [({"num_classes": 0}, "head.options.num_classes"), ({"num_clases": 3}, "head.options.num_clases"),
     ({"block_indices": [1, 2, 3]}, "head.options.block_indices"), ({"pool_scales": []}, "head.options.pool_scales"),
     ({"sync_batchnorm": "sometimes"}, "head.options.sync_batchnorm"),
     ({"auxiliary_loss_weight": -1}, "head.options.auxiliary_loss_weight"),
     ({"block_indices": [0, 1, 2, 9]}, "head.options.block_indices")],
)
def test_bad_options_name_the_field(options, field):
    with pytest.raises(OptionsError) as err:
        _tiny(**options)
    assert err.value.path == field, err.value


def test_registered_and_contract():
    from beitdist.heads.base import contract_problems

    assert plugins.head_class("segmentation") is SegmentationHead
    assert contract_problems(SegmentationHead) == []
