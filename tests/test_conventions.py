"""Conventions users bring from transformers, timm and Lightning: `from_pretrained` /
`save_pretrained`, `forward(labels=)` -> `.loss`, `create_model` over timm's names, and the two
trainers driving a beitdist model unchanged."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import beitdist
from beitdist import BeitForTask, create_model, list_models
from beitdist.backbone.config import variant
from beitdist.backbone.convert import CheckpointError
from beitdist.errors import InputError
from beitdist.model import build_model
from beitdist.model_names import ModelNameError, parse_model_name
from beitdist.output_paths import OutputError

TINY = dict(image_size=32, depth=2)


def _tiny(head="classification", options=None):
    return build_model(variant("tiny", **TINY), head, options if options is not None else {"num_classes": 3})


def test_from_pretrained_and_save_pretrained_round_trip_both_formats(tmp_path):
    model = _tiny().eval()
    x = torch.randn(2, 3, 32, 32)
    for fmt in ("beitdist", "hf"):
        out = model.save_pretrained(tmp_path / fmt, format=fmt)
        again = BeitForTask.from_pretrained(out)
        assert again.head_name == "classification" and not again.training
        torch.testing.assert_close(again(x).logits, model(x).logits, rtol=0, atol=1e-6)
    with pytest.raises(OutputError):  # an existing checkpoint is replaced only when asked
        model.save_pretrained(tmp_path / "beitdist")
    model.save_pretrained(tmp_path / "beitdist", overwrite=True)
    with pytest.raises(InputError, match="format must be"):
        model.save_pretrained(tmp_path / "x", format="onnx")


def test_a_hub_id_is_refused_with_how_to_fetch_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointError) as err:
        BeitForTask.from_pretrained("microsoft/beit-base-patch16-224")
    assert "never downloads" in str(err.value) and "huggingface-cli download microsoft/beit-base-patch16-224" in str(
        err.value)


@pytest.mark.parametrize("head", ["classification", "segmentation", "mim"])
def test_labels_in_forward_give_the_heads_own_loss(head):
    torch.manual_seed(0)
    options = {"num_classes": 3} if head != "mim" else {"vocab_size": 16}
    model = _tiny(head, options).eval()
    x = torch.randn(2, 3, 32, 32)
    mask = None
    if head == "classification":
        labels = torch.tensor([0, 2])
    elif head == "segmentation":
        labels = torch.randint(0, 3, (2, 32, 32))
    else:
        labels = torch.randint(0, 16, (2, 4))
        mask = torch.tensor([[1, 0, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    out = model(x, mask, labels=labels)
    batch = {"pixel_values": x, "labels": labels, **({"bool_masked_pos": mask} if mask is not None else {})}
    assert out["loss"] is out.loss and torch.isfinite(out.loss)
    torch.testing.assert_close(out.loss, model.loss(model(x, mask), batch))
    assert model(x, mask).loss is None


def test_create_model_builds_timms_names():
    base = parse_model_name("beit_base_patch16_224").config()
    assert (base.embed_dim, base.depth, base.num_heads, base.image_size, base.layer_scale_init) == (
        768, 12, 12, (224, 224), 0.1)
    large = parse_model_name("beit_large_patch16_512").config()
    assert (large.embed_dim, large.depth, large.image_size, large.layer_scale_init) == (1024, 24, (512, 512), 1e-5)
    assert parse_model_name("beitv2_base_patch16_224").config().layer_scale_init == 1e-5
    assert "beit_large_patch16_512" in list_models() and list_models("beitv2_*") == [
        "beitv2_base_patch16_224", "beitv2_large_patch16_224"]
    model = create_model("beit_tiny_patch16_32", depth=2, drop_path_rate=0.2)
    assert model.training and model.head.classifier.out_features == 1000 and model.config.drop_path_rate == 0.2
    assert create_model("beit_tiny_patch16_32", num_classes=0, depth=2).head is None
    assert create_model("beit_tiny_patch16_32", num_classes=7, depth=2).head.classifier.out_features == 7
    assert beitdist.create_model is create_model


@pytest.mark.parametrize("name,message", [
    ("vit_base_patch16_224", "expected beit_<size>"),
    ("beit_gigantic_patch16_224", "unknown size 'gigantic'"),
    ("beit_base_patch16_224.in22k_ft_in22k_in1k", "pass the weights as pretrained=PATH"),
])
def test_create_model_refuses_names_it_cannot_build(name, message):
    with pytest.raises(ModelNameError, match=message):
        create_model(name)


def test_create_model_from_a_local_checkpoint_resamples_to_the_named_resolution(tmp_path):
    saved = _tiny().save_pretrained(tmp_path / "ckpt")
    model = create_model("beit_tiny_patch16_64", pretrained=saved, depth=2)
    assert model.config.image_size == (64, 64) and model.head.classifier.out_features == 3
    assert model(torch.randn(1, 3, 64, 64)).logits.shape == (1, 3)
    with pytest.raises(ModelNameError, match="not beit_small_patch16_64"):
        create_model("beit_small_patch16_64", pretrained=saved, depth=2)


class _Images(torch.utils.data.Dataset):
    """Two classes a tiny model separates in a few steps: bright and dark images."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        label = i % 2
        g = torch.Generator().manual_seed(i)
        return {"pixel_values": torch.randn(3, 32, 32, generator=g) * 0.1 + (1.0 if label else -1.0),
                "labels": torch.tensor(label)}


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_transformers_trainer_trains_a_beitdist_model_unchanged(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    model = _tiny(options={"num_classes": 2}).train()
    before = _weights(model)
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8,
                                          max_steps=6, learning_rate=1e-3, report_to=[], use_cpu=True,
                                          save_strategy="no", logging_steps=1, dataloader_num_workers=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Images())
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert result.global_step == 6 and len(losses) == 6 and all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.config.use_cache is False  # the one attribute the Trainer sets; the architecture stays frozen
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.config.depth = 3


def test_lightning_module_trains_a_beitdist_model_unchanged(tmp_path):
    lightning = pytest.importorskip("lightning")

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = _tiny(options={"num_classes": 2})
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    module = Module()
    before = _weights(module.model)
    trainer = lightning.Trainer(max_steps=6, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, torch.utils.data.DataLoader(_Images(), batch_size=8))
    assert trainer.global_step == 6 and len(module.losses) == 6
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items())
