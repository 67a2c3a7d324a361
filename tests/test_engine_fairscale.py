"""The fairscale engine (`engine.backend: fairscale`): recipe errors, availability, checkpoint
format, and one end-to-end comparison with DeepSpeed ZeRO-2 on 2 gloo ranks (plus a resume).

fairscale 0.4.13 on CPU runs OSS + ShardedDataParallel and checkpoint_wrapper; its
FullyShardedDataParallel is GPU-only, so `fairscale_mode: fsdp` is only checked for its error here.
"""

from __future__ import annotations

import importlib
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from beitdist import engines
from beitdist.run import checkpoints as ckpts
from beitdist.engines.config import EngineConfig
from beitdist.engines.fairscale import checkpoints as fairscale_checkpoints
from beitdist.optim import OptimConfig
from beitdist.recipe import RecipeError, parse_recipe
from tests.distributed import TINY_RECIPE, merge, result_of, run_recipe


# ------------------------------------------------------------------------------ recipe errors
@pytest.mark.parametrize(("engine", "expected"), [
    ({"backend": "fairscal"}, "engine.backend: got 'fairscal'; allowed: deepspeed, fairscale (did you mean 'fairscale'?)"),
    ({"backend": "fairscale", "fairscale_mode": "zero3"}, "engine.fairscale_mode: got 'zero3'; allowed: oss, fsdp"),
    ({"backend": "fairscale", "zero_stage": 3},
     "engine.zero_stage: is a DeepSpeed setting (got 3), but engine.backend is fairscale; use engine.fairscale_mode: oss"),
    ({"backend": "fairscale", "preset": "zero2"}, "engine.preset: is a DeepSpeed setting (got 'zero2')"),
    ({"backend": "fairscale", "offload_optimizer": True},
     "engine.offload_optimizer: is a DeepSpeed setting, but engine.backend is fairscale; remove it"),
    ({"backend": "fairscale", "raw": {"steps_per_print": 1}}, "engine.raw: is DeepSpeed's config, but engine.backend is fairscale"),
    ({"backend": "fairscale", "precision": "fp16"}, "engine.precision: fp16 is not supported with engine.backend fairscale"),
    ({"backend": "fairscale", "offload_activations": True},
     "engine.offload_activations: needs engine.activation_checkpointing: true"),
    ({"fairscale_mode": "fsdp"}, "engine.fairscale_mode: is 'fsdp', but engine.backend is deepspeed; set engine.backend: fairscale"),
    ({"activation_checkpointing": True, "offload_activations": True},
     "engine.offload_activations: is a fairscale setting (checkpoint_wrapper), but engine.backend is deepspeed"),
])
def test_bad_engine_sections_give_one_line(engine, expected):
    with pytest.raises(RecipeError) as info:
        parse_recipe({"engine": engine})
    message = str(info.value)
    assert message.startswith("recipe: ") and expected in message and "\n" not in message, message


def test_fairscale_recipe_parses_and_plans_like_its_zero_stage():
    recipe = parse_recipe({"engine": {"backend": "fairscale", "activation_checkpointing": True,
                                      "offload_activations": True, "precision": "bf16"}})
    assert recipe.engine.backend == "fairscale" and recipe.engine.fairscale_mode == "oss"
    assert recipe.engine.stage == 2  # memory planning: OSS + ShardedDataParallel shard like ZeRO-2
    assert EngineConfig(backend="fairscale", fairscale_mode="fsdp").stage == 3
    assert parse_recipe(recipe.to_dict()) == recipe


# ------------------------------------------------------------------------------ availability
FSDP_ON_CPU = ("engine.fairscale_mode: fsdp needs CUDA GPUs (fairscale's FullyShardedDataParallel is GPU-only), "
               "but this process has none; use engine.fairscale_mode: oss (sharded optimizer state, runs on CPU) "
               "or engine.backend: deepspeed (ZeRO-3 runs on CPU)")


def test_fsdp_on_cpu_is_a_clear_error():
    config = EngineConfig(backend="fairscale", fairscale_mode="fsdp")
    with pytest.raises(engines.EngineUnavailableError) as info:
        engines.create_engine(config, OptimConfig(), 8, 2, torch.device("cpu"))
    assert str(info.value) == FSDP_ON_CPU
    assert isinstance(info.value, ValueError)  # the CLI reports it as bad input: one line, exit 2


def test_fairscale_not_installed_is_a_clear_error(monkeypatch):
    real = importlib.import_module

    def without_fairscale(name, *args, **kwargs):
        if name == "fairscale" or name.startswith("fairscale."):
            raise ModuleNotFoundError("No module named 'fairscale'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_fairscale)
    with pytest.raises(engines.EngineUnavailableError) as info:
        engines.check_engine_available(EngineConfig(backend="fairscale"))
    assert str(info.value) == (
        "engine.backend: fairscale is selected but fairscale is not installed (No module named 'fairscale'); "
        "install it with `pip install 'beitdist[fairscale]'` (fairscale==0.4.13), or set engine.backend: deepspeed")
    engines.check_engine_available(EngineConfig())  # DeepSpeed needs no fairscale


# ------------------------------------------------------------------------------ checkpoint format
def test_fairscale_checkpoint_is_recognised_and_consolidates(tmp_path):
    tag_dir = tmp_path / "step_3"
    tag_dir.mkdir()
    weights = {"backbone.cls_token": torch.randn(1, 1, 4, dtype=torch.bfloat16), "backbone.index": torch.arange(3)}
    torch.save({"module": weights, "world_size": 2, "mode": "oss"}, tag_dir / fairscale_checkpoints.MODEL_FILE)
    torch.save({"state": {}, "param_groups": []}, tag_dir / fairscale_checkpoints.OPTIM_FILE)
    ckpts.commit_checkpoint(tmp_path, "step_3", world_size=2)
    assert ckpts.checkpoint_backend(tag_dir) == "fairscale" and ckpts.complete_tags(tmp_path) == ["step_3"]
    state = ckpts.consolidated_state_dict(tmp_path, "step_3")
    assert state["backbone.cls_token"].dtype == torch.float32 and state["backbone.index"].dtype == torch.int64
    torch.testing.assert_close(state["backbone.cls_token"], weights["backbone.cls_token"].float())
    assert ckpts.checkpoint_backend(tmp_path / "elsewhere") == "deepspeed"


# ------------------------------------------------------------------------------ end to end
def _final(tmp_path, name):
    return load_file(str(tmp_path / "runs" / name / "final" / "model.safetensors"))


@pytest.mark.slow
def test_fairscale_oss_matches_deepspeed_zero2_and_resumes_exactly(tmp_path):
    """Same seed, same recipe: DeepSpeed ZeRO-2 and fairscale OSS + ShardedDataParallel (with
    checkpoint_wrapper offloading activations, which must not change the numbers) give the same
    losses and weights after 6 steps of 2 accumulated micro-batches on 2 ranks, with layer-wise lr
    decay, warmup + cosine lr, cosine weight decay and active clipping. Then the fairscale run,
    cut back to its step_3 checkpoint, resumes to the same weights as uninterrupted."""
    base = merge(TINY_RECIPE, {"train": {"steps": 6, "checkpoint_every": 3},
                               "optim": {"layer_decay": 0.75, "clip_grad": 0.5, "weight_decay_end": 0.2},
                               "engine": {"grad_accum": 2}})
    ds = merge(base, {"name": "ds", "engine": {"zero_stage": 2}})
    fs = merge(base, {"name": "fs", "engine": {"backend": "fairscale", "activation_checkpointing": True,
                                               "offload_activations": True}})
    run_recipe(ds, tmp_path)
    run_recipe(fs, tmp_path)
    ds_result, fs_result = result_of(ds, tmp_path), result_of(fs, tmp_path)
    assert fs_result["world_size"] == 2 and len(fs_result["losses"]) == 6
    assert fs_result["losses"] == pytest.approx(ds_result["losses"], abs=1e-5)
    a, b = _final(tmp_path, "ds"), _final(tmp_path, "fs")
    assert sorted(a) == sorted(b)
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert diff < 1e-5, diff
    assert (tmp_path / "runs/fs/checkpoints/step_6" / fairscale_checkpoints.OPTIM_FILE).exists()
    assert not list((tmp_path / "runs/fs/checkpoints/step_6").glob("*zero*"))

    # resume: a copy of the run cut back to step_3 (as if stopped there) finishes like the whole run
    again = merge(fs, {"name": "fs_again"})
    shutil.copytree(tmp_path / "runs/fs", tmp_path / "runs/fs_again")
    ckpts.discard_checkpoint(tmp_path / "runs/fs_again/checkpoints", "step_6")
    shutil.rmtree(tmp_path / "runs/fs_again/final")
    (tmp_path / "runs/fs_again" / "train_result.json").unlink()
    assert ckpts.read_latest(tmp_path / "runs/fs_again/checkpoints") == "step_3"
    out = run_recipe(again, tmp_path)
    assert "resumed from step_3 at step 3" in out.stderr
    resumed = result_of(again, tmp_path)
    assert resumed["losses"] == pytest.approx(fs_result["losses"][3:], abs=1e-6)
    c = _final(tmp_path, "fs_again")
    for key in b:
        torch.testing.assert_close(c[key], b[key], atol=1e-6, rtol=0, msg=key)
    state = json.loads((tmp_path / "runs/fs_again/checkpoints/step_6/beitdist_state.json").read_text())
    assert state["recipe"]["engine"]["backend"] == "fairscale" and state["step"] == 6
