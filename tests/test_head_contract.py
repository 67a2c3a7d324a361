"""The head contract beyond forward/loss: what the rest of beitdist asks a head (data needs,
evaluation, pictures, conversion), answered by a third-party head exactly as by a built-in one.

The third-party head is `tests/masked_pixels_plugin.py` (masked pixel regression: a mask, no
labels, no tokenizer), registered for one test through the plugin manager.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

import beitdist
from beitdist import plugins
from beitdist.data.needs import DataNeeds
from beitdist.data.pipeline import build_loaders
from beitdist.heads import KeyMap
from beitdist.heads.base import contract_problems
from tests import masked_pixels_plugin
from tests.distributed import TINY_RECIPE, merge

ROOT = Path(__file__).resolve().parents[1]
DIGITS = {"dataset": "digits", "options": {"train_fraction": 0.1}, "batch_size": 8}
TINY = beitdist.BackboneConfig(embed_dim=32, depth=2, num_heads=4, image_size=32, patch_size=8)


@pytest.fixture
def masked_pixels():
    name = plugins.register(masked_pixels_plugin, name="masked_pixels")
    try:
        yield masked_pixels_plugin.MaskedPixelsHead
    finally:
        plugins.unregister(name)


@dataclass(frozen=True)
class _NoOptions:
    pass


def _head(**attrs):
    """A head class with `attrs`; forward and loss implemented."""
    body = {"name": "probe", "Options": _NoOptions, "needs": "tokens",
            "forward": lambda self, f, m=None: f, "loss": lambda self, o, b: o.logits.sum(), **attrs}
    return type("ProbeHead", (beitdist.Head,), body)


# ------------------------------------------------------------------ data needs
def test_builtin_heads_declare_their_batches():
    heads = plugins.get_registries().heads
    assert heads.get("classification").data_needs == DataNeeds(labels="class")
    assert heads.get("mim").data_needs == DataNeeds(labels=None, mask=True, tokenizer=True)
    assert heads.get("segmentation").data_needs == DataNeeds(labels="map")
    assert heads.get("mim").data_needs.batch_keys() == {"pixel_values", "bool_masked_pos", "tokenizer_pixels"}


def test_a_mask_head_that_declares_nothing_gets_masks_and_no_labels():
    assert _head().data_needs == DataNeeds(labels="class")
    assert _head(uses_mask=True).data_needs == DataNeeds(labels=None, mask=True)
    declared = DataNeeds(labels=None, mask=True, tokenizer=True)
    assert _head(uses_mask=True, data_needs=declared).data_needs is declared
    assert contract_problems(_head(uses_mask=True)) == []


def test_contract_refuses_inconsistent_declarations():
    problems = contract_problems(_head(uses_mask=True, data_needs=DataNeeds(labels="class")))
    assert problems == ["uses_mask is True but data_needs has no mask: its batches would carry no bool_masked_pos"]
    assert "data_needs must be a beitdist.data.needs.DataNeeds" in contract_problems(_head(data_needs="mim"))[0]
    assert "hf_keys must be a beitdist.heads.KeyMap" in contract_problems(_head(hf_keys={"a": "head.a"}))[0]
    assert "hf_architecture is set but hf_keys is not" in contract_problems(_head(hf_architecture="BeitForX"))[0]
    with pytest.raises(ValueError, match="cannot also ask for a mask"):
        DataNeeds(labels="class", mask=True)
    with pytest.raises(ValueError, match="must be one of"):
        DataNeeds(labels="pixels")
    with pytest.raises(ValueError, match="under 'head.'"):
        KeyMap((("decoder", "decoder"),))


def test_third_party_mask_head_gets_masked_batches_without_tokenizer_view(masked_pixels):
    train, val = build_loaders({**DIGITS, "num_masking_patches": 5}, "masked_pixels", 32, 8, seed=0)
    for batch in (next(iter(train)), next(iter(val))):
        assert batch.keys() == {"pixel_values", "bool_masked_pos"}
        assert batch["pixel_values"].shape == (8, 3, 32, 32)
        mask = batch["bool_masked_pos"]
        assert mask.shape == (8, 16) and mask.dtype == torch.bool
        assert (mask.sum(1) <= 5).all() and mask.sum() > 0
    model = beitdist.build_model(TINY, "masked_pixels")
    out = model(batch["pixel_values"], batch["bool_masked_pos"])
    assert model.loss(out, batch).ndim == 0


def test_masks_and_pixels_are_those_of_the_mim_pipeline_without_the_tokenizer_view():
    """The same samples, crops and masks as MIM's batches: only the tokenizer view is left out."""
    cfg = {**DIGITS, "num_masking_patches": 5}
    mim = next(iter(build_loaders(cfg, "mim", 32, 8, seed=3, tokenizer_input_size=16)[0]))
    masked = next(iter(build_loaders(cfg, DataNeeds(labels=None, mask=True), 32, 8, seed=3)[0]))
    for key in masked:
        torch.testing.assert_close(masked[key], mim[key], rtol=0, atol=0)


def test_recipe_asks_for_a_tokenizer_only_when_the_head_needs_one(masked_pixels):
    from beitdist.recipe import parse_recipe

    recipe = parse_recipe({**TINY_RECIPE, "head": {"name": "masked_pixels"}})
    assert recipe.tokenizer.name is None
    with pytest.raises(ValueError, match="tokenizer.name: the mim head needs a tokenizer"):
        parse_recipe({**TINY_RECIPE, "head": {"name": "mim"}})


# ------------------------------------------------------------------ evaluation
def test_evaluate_batch_default_and_segmentation_slide():
    from beitdist.heads.segmentation_eval import slide_inference

    model = beitdist.build_model(TINY, "segmentation", {"num_classes": 3, "auxiliary_channels": 8}).eval()
    batch = {"pixel_values": torch.randn(2, 3, 48, 40)}
    calls = []

    def forward(pixels, mask):
        calls.append(tuple(pixels.shape[-2:]))
        return model(pixels, mask)

    with torch.no_grad():
        slide = model.head.evaluate_batch(forward, batch, "slide")
        expected = slide_inference(lambda x: model(x).logits, batch["pixel_values"], crop=32, stride=21, num_classes=3)
        torch.testing.assert_close(slide.logits, expected)
        assert set(calls) == {(32, 32)} and len(calls) == 4
        square = {"pixel_values": torch.randn(2, 3, 32, 32)}
        whole = model.head.evaluate_batch(forward, square, "whole")
        torch.testing.assert_close(whole.logits, model(square["pixel_values"]).logits)
        classifier = beitdist.build_model(TINY, "classification", {"num_classes": 3}).eval()
        out = classifier.head.evaluate_batch(lambda x, m: classifier(x, m), square, "slide")  # no slide: whole
        torch.testing.assert_close(out.logits, classifier(square["pixel_values"]).logits)


# ------------------------------------------------------------------ pictures
def test_pictures_default_draws_inputs_and_masks_segmentation_adds_predictions():
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :3] = True
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "bool_masked_pos": mask}
    drawn = masked_pixels_plugin.MaskedPixelsHead.pictures(batch, lambda: pytest.fail("no model needed"))
    assert sorted(drawn) == ["input_0.png", "input_1.png", "masked_0.png", "masked_1.png"]
    assert drawn["masked_0.png"].getpixel((0, 0)) == (128, 128, 128)
    seg = beitdist.build_model(TINY, "segmentation", {"num_classes": 3, "auxiliary_channels": 8}).train()
    drawn = type(seg.head).pictures({"pixel_values": batch["pixel_values"]}, lambda: seg)
    assert sorted(drawn) == ["input_0.png", "input_1.png", "prediction_0.png", "prediction_1.png"]
    assert seg.training  # the live model's mode is restored
    assert sorted(type(seg.head).pictures({"pixel_values": batch["pixel_values"]}, lambda: None)) == [
        "input_0.png", "input_1.png"]


# ------------------------------------------------------------------ conversion
def test_foreign_checkpoint_head_recognised_by_the_plugins_keymap(masked_pixels, tmp_path):
    model = beitdist.build_model(TINY, "masked_pixels")
    unilm = {k if k.startswith("backbone.") else k.removeprefix("head."): v for k, v in model.state_dict().items()}
    torch.save({"model": unilm}, tmp_path / "pretrain.pth")
    loaded = beitdist.load_model(tmp_path / "pretrain.pth", head="auto")
    assert loaded.head_name == "masked_pixels"
    for key, value in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0, msg=key)
    with pytest.raises(beitdist.CheckpointError, match="'masked_pixels' has no transformers equivalent; "
                                                       "exportable: classification, mim, segmentation"):
        beitdist.export_hf(model, tmp_path / "hf")


class RivalHead(beitdist.Head):
    """A plugin head that claims unilm's `head` keys, as the classification head does."""

    name = "rival"
    Options = _NoOptions
    needs = "pooled"
    pooling = ("mean", "cls")
    unilm_keys = KeyMap((("head", "head.classifier"),))

    def __init__(self, backbone, options=None):
        super().__init__(backbone, options)
        self.classifier = torch.nn.Linear(backbone.embed_dim, 3)

    def forward(self, features, bool_masked_pos=None):
        return self.classifier(features)

    def loss(self, output, batch):
        return output.logits.sum()


def test_keys_claimed_by_two_heads_are_settled_by_the_head_asked_for(tmp_path):
    classifier = beitdist.build_model(TINY, "classification", {"num_classes": 3})
    unilm = {k.removeprefix("backbone.") if k.startswith("backbone.") else "head." + k.split(".")[-1]: v
             for k, v in classifier.state_dict().items()}
    torch.save(unilm, tmp_path / "finetuned.pth")
    rival = types.SimpleNamespace(beitdist_register_heads=beitdist.hookimpl(lambda registry: registry.add(RivalHead)))
    name = plugins.register(rival, name="rival_plugin")
    try:
        with pytest.raises(beitdist.CheckpointError, match=r"fit several heads: 'classification' .*'rival' \(plugin "
                                                           r"'rival_plugin'"):
            beitdist.load_model(tmp_path / "finetuned.pth", head="auto")
        loaded = beitdist.load_model(tmp_path / "finetuned.pth", head="classification")
        torch.testing.assert_close(loaded.head.classifier.weight, classifier.head.classifier.weight)
        assert beitdist.load_model(tmp_path / "finetuned.pth", head="rival").head_name == "rival"
    finally:
        plugins.unregister(name)
    assert beitdist.load_model(tmp_path / "finetuned.pth", head="auto").head_name == "classification"


def test_export_writes_the_heads_config_entries(tmp_path):
    model = beitdist.build_model(TINY, "mim", {"vocab_size": 40})
    beitdist.export_hf(model, tmp_path / "mim")
    config = json.loads((tmp_path / "mim" / "config.json").read_text())
    assert config["architectures"] == ["BeitForMaskedImageModeling"] and config["vocab_size"] == 40
    beitdist.export_hf(beitdist.build_model(TINY), tmp_path / "bare")
    assert json.loads((tmp_path / "bare" / "config.json").read_text())["architectures"] == ["BeitModel"]


# ------------------------------------------------------------------ training
TRAIN_IN_A_FRESH_PROCESS = """
import json, sys

import beitdist
from beitdist import distributed as eng
from beitdist import plugins, train
from beitdist.recipe import parse_recipe
from tests import masked_pixels_plugin

plugins.register(masked_pixels_plugin, name="masked_pixels")  # as a test registers a plugin module
seen = {}


class Spy:
    @beitdist.hookimpl
    def beitdist_on_train_end(self, context, step, metrics, final_dir):
        seen["keys"] = sorted(context.extras["sample_batch"])


plugins.register(Spy(), name="spy")
result = train.run(parse_recipe(json.loads(sys.argv[1])), eng.DistInfo())
print("RESULT " + json.dumps({"keys": seen["keys"], "step": result.step, "losses": result.losses,
                              "metrics": result.metrics, "final_dir": str(result.final_dir)}))
"""


def _train_in_a_fresh_process(recipe: dict, tmp_path: Path) -> dict:
    """`beitdist.train.run` on one rank (DeepSpeed ZeRO-0) in a fresh Python process that registers
    tests/masked_pixels_plugin.py first: DeepSpeed keeps its process groups in module globals, so a
    second run in the same process (this test session) would find stale ones."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-c", TRAIN_IN_A_FRESH_PROCESS, json.dumps(recipe)], capture_output=True,
                          text=True, env=env, cwd=tmp_path, timeout=300)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, f"training failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return json.loads(lines[-1].removeprefix("RESULT "))


@pytest.mark.slow
def test_third_party_mask_head_trains_through_train_run(masked_pixels, tmp_path):
    """A few steps: the batches carry the mask and no tokenizer view, the loss is finite, the
    head's metric is reported and the final weights load with their head."""
    recipe = merge(TINY_RECIPE, {"name": "masked", "output_dir": str(tmp_path / "runs"),
                                 "data": {"options": {"train_fraction": 0.2}, "num_masking_patches": 4},
                                 "train": {"steps": 4}})
    recipe["head"] = {"name": "masked_pixels"}
    result = _train_in_a_fresh_process(recipe, tmp_path)
    assert result["keys"] == ["bool_masked_pos", "pixel_values"]
    assert result["step"] == 4 and len(result["losses"]) == 4 and all(map(math.isfinite, result["losses"]))
    assert math.isfinite(result["metrics"]["val_masked_l1"]) and math.isfinite(result["metrics"]["val_loss"])
    assert beitdist.load_model(result["final_dir"], head="auto").head_name == "masked_pixels"


@pytest.mark.slow
def test_segmentation_slide_evaluation_through_train_run(tmp_path):
    """train.eval_mode 'slide' reaches the segmentation head's evaluate_batch through the engine."""
    from tests.test_data_datasets import make_ade

    make_ade(tmp_path / "ade", n=4)
    make_ade(tmp_path / "ade", n=2, split="validation")
    recipe = merge(TINY_RECIPE, {"name": "seg_slide", "output_dir": str(tmp_path / "runs"),
                                 "data": {"dataset": "ade20k", "options": {"root": str(tmp_path / "ade")},
                                          "batch_size": 2, "val_batch_size": 2},
                                 "train": {"steps": 2, "eval_mode": "slide"}})
    recipe["head"] = {"name": "segmentation", "options": {"block_indices": [0, 1, 1, 1], "auxiliary_channels": 8}}
    result = _train_in_a_fresh_process(recipe, tmp_path)
    assert result["keys"] == ["labels", "pixel_values"]
    assert result["step"] == 2 and math.isfinite(result["metrics"]["val_loss"]) and "val_mIoU" in result["metrics"]
