"""Training BEiT v2's VQ-KD tokenizer (`head: vqkd_training`) on the digits with the fine-tuned quickstart
model as its frozen teacher: the loss falls, dead-code restarts keep >= 80% of a 64-code book in
use (and without them far less is), and the exported tokenizer gives the same tokens every time."""

from __future__ import annotations

import json

import pytest
import torch

from tests.distributed import result_of, run_recipe

pytestmark = pytest.mark.slow


def _recipe(name: str, teacher: str, restart_after: int) -> dict:
    return {
        "name": name, "seed": 0,
        "model": {"variant": "tiny", "backbone": {"embed_dim": 128, "depth": 4, "num_heads": 4, "image_size": 32,
                                                   "patch_size": 8, "drop_path_rate": 0.0}},
        "head": {"name": "vqkd_training", "options": {"teacher": teacher, "num_codes": 64, "code_dim": 16, "decay": 0.9,
                                             "decoder_depth": 1, "restart_after": restart_after}},
        "data": {"dataset": "digits", "batch_size": 32, "val_batch_size": 128,
                 "augment": {"rand_augment": None, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "hflip": 0.0,
                             "color_jitter": None, "scale": [0.7, 1.0], "normalization": "standard"}},
        "optim": {"lr": 1e-3, "min_lr": 1e-5, "warmup_steps": 10, "weight_decay": 0.05, "clip_grad": 3.0},
        "engine": {"zero_stage": 0},
        "train": {"steps": 120, "eval_every": 120, "log_every": 0},
        "tracking": {"enabled": False},
    }


def test_vqkd_on_digits_uses_its_book_and_tokenizes_deterministically(quickstart_launch, tmp_path):
    teacher = str(quickstart_launch[0] / "final")
    runs = {}
    for name, restart in (("vqkd_restarts", 10), ("vqkd_no_restarts", 0)):
        recipe = _recipe(name, teacher, restart)
        run_recipe(recipe, tmp_path, nproc=1)
        runs[name] = result_of(recipe, tmp_path)
    with_restarts, without = runs["vqkd_restarts"], runs["vqkd_no_restarts"]
    losses = with_restarts["losses"]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.05, (losses[:10], losses[-10:])
    used, unused = with_restarts["metrics"]["val_codebook_usage"], without["metrics"]["val_codebook_usage"]
    assert used >= 0.8, with_restarts["metrics"]
    assert unused < used, (unused, used)
    (tmp_path / "usage.json").write_text(json.dumps({"with_restarts": with_restarts["metrics"],
                                                     "without": without["metrics"]}))

    from beitdist import plugins
    from beitdist.heads.vqkd import export_vqkd
    from beitdist.tokenizers.fit import load_digits_images

    from beitdist.cli import main

    path = tmp_path / "digits_vqkd.safetensors"
    assert main(["tokenizer", "export-vqkd", str(tmp_path / "runs" / "vqkd_restarts"), "--out", str(path)]) == 0
    with pytest.raises(Exception, match="already exists|--overwrite"):  # never replaced silently
        export_vqkd(tmp_path / "runs" / "vqkd_restarts", path)
    tokenizer = plugins.tokenizer_class("vqkd")({"path": str(path), "input_size": 32, "process": "default"})
    assert tokenizer.vocab_size == 64
    images, _ = load_digits_images(32, limit=64)
    first, second = tokenizer.encode(images), tokenizer.encode(images)
    assert first.shape == (64, 16) and torch.equal(first, second)
    assert len(set(first.flatten().tolist())) > 16
    assert torch.equal(first, _head_codes(tmp_path / "runs" / "vqkd_restarts", images))  # what training quantised


def _head_codes(run_dir, images: torch.Tensor) -> torch.Tensor:
    """The codes the trained head itself picks for `images` in [0, 1] (normalised as the recipe's
    "standard": the tokenizer's "default")."""
    from beitdist.checkpoint import load_model

    model = load_model(run_dir, head="auto").eval()
    with torch.no_grad():
        features = model.backbone(images * 2 - 1).last_hidden_state[:, 1:]
        z = model.head.encode_task_layer(model.head.encoder_norm(features))
        return model.head.quantize.lookup(z.reshape(-1, z.shape[-1])).reshape(z.shape[:2])
