"""End-to-end training with DeepSpeed on 2 gloo ranks (torchrun), and the single-process path.

Each run is a real `beitdist train` process tree; results are read from the run directory
(`train_result.json`, checkpoints, the consolidated final weights), written before teardown.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import TINY_RECIPE, merge, result_of, run_recipe

pytestmark = pytest.mark.slow


def _deepspeed_shm_buffers() -> set[str]:
    """DeepSpeed's CPU allreduce buffers in /dev/shm (beitdist unlinks them after start-up)."""
    shm = Path("/dev/shm")
    return {p.name for p in shm.glob("deepspeed_allreduce_buffer_*")} if shm.is_dir() else set()


def final_weights(recipe, tmp_path):
    return load_file(str(tmp_path / "runs" / recipe["name"] / "final" / "model.safetensors"))


def test_zero_stages_give_the_same_training(tmp_path):
    base = merge(TINY_RECIPE, {"train": {"steps": 30}, "optim": {"lr": 5e-3}, "data": {"batch_size": 32}})
    runs = {}
    shm_before = _deepspeed_shm_buffers()
    for stage in (0, 1, 2, 3):
        recipe = merge(base, {"name": f"zero{stage}", "engine": {"zero_stage": stage}})
        run_recipe(recipe, tmp_path)
        runs[stage] = (recipe, result_of(recipe, tmp_path))
    assert _deepspeed_shm_buffers() <= shm_before, "DeepSpeed's /dev/shm allreduce buffers were left behind"
    reference_recipe, reference = runs[0]
    losses = reference["losses"]
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.03, losses
    assert reference["world_size"] == 2 and 0.0 <= reference["metrics"]["val_top1"] <= 1.0
    weights0 = final_weights(reference_recipe, tmp_path)
    for stage in (1, 2, 3):
        recipe, result = runs[stage]
        assert result["losses"] == pytest.approx(losses, abs=1e-4), f"ZeRO-{stage}"
        weights = final_weights(recipe, tmp_path)
        assert sorted(weights) == sorted(weights0)
        for key in weights0:
            torch.testing.assert_close(weights[key], weights0[key], atol=1e-5, rtol=1e-4, msg=f"ZeRO-{stage} {key}")


def test_resume_equals_uninterrupted_run(tmp_path):
    base = merge(TINY_RECIPE, {"name": "whole", "train": {"steps": 6, "checkpoint_every": 3},
                               "engine": {"zero_stage": 2}})
    run_recipe(base, tmp_path)
    interrupted = merge(base, {"name": "interrupted", "train": {"stop_at": 3}})
    run_recipe(interrupted, tmp_path)
    stopped = result_of(interrupted, tmp_path) if (tmp_path / "runs/interrupted/train_result.json").exists() else None
    assert stopped is None  # a stopped run writes no final result
    state = json.loads((tmp_path / "runs/interrupted/checkpoints/step_3/beitdist_state.json").read_text())
    assert state["step"] == 3 and state["loader"]["position"] == 3 * 8 * 2
    resumed = merge(base, {"name": "interrupted"})
    out = run_recipe(resumed, tmp_path)
    assert "resumed from step_3 at step 3" in out.stderr
    whole, again = result_of(base, tmp_path), result_of(resumed, tmp_path)
    assert again["losses"] == pytest.approx(whole["losses"][3:], abs=1e-6)
    assert [e["step"] for e in again["eval_history"]] == [e["step"] for e in whole["eval_history"]] == [6]
    assert again["eval_history"][-1] == pytest.approx(whole["eval_history"][-1], abs=1e-6)
    timing = again["timing"]  # this attempt's steps 4..6, each timed without its evaluation and save
    assert timing["first_timed_step"] == 4 and len(timing["iteration_s"]) == 3
    assert timing["started_at"] <= timing["setup_done_at"] <= timing["first_step_done_at"]
    assert all(0 < s < 60 for s in timing["iteration_s"]) and again["images_per_step"] == 16
    assert len(timing["data_s"]) == 3 and all(0 < d < s for d, s in zip(timing["data_s"], timing["iteration_s"]))
    a, b = final_weights(base, tmp_path), final_weights(resumed, tmp_path)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-6, rtol=0, msg=key)
    # a finished run launched again has nothing to do and keeps its result
    again_out = run_recipe(resumed, tmp_path, nproc=1)
    assert "already finished at step 6; nothing to do" in again_out.stderr
    assert result_of(resumed, tmp_path) == again


@pytest.mark.parametrize(("stage", "first", "second"), [(3, 2, 1), (3, 1, 2), (2, 2, 1), (0, 1, 2)])
def test_checkpoint_resumes_at_another_world_size_with_the_same_global_batch(tmp_path, stage, first, second):
    """Elastic: a run checkpointed on `first` ranks continues on `second` ranks (ZeRO-1/2/3
    through a universal checkpoint, ZeRO-0 directly: its optimizer state is not sharded); with scaling.global_batch_size pinned, gradient accumulation makes up the
    difference (16 = 8 x 1 x 2 = 8 x 2 x 1), the sampler hands out the same 16 samples per step,
    and the final weights equal those of an uninterrupted run on `first` ranks. Drop path is off:
    its randomness is drawn per rank and would differ by construction. The elastic run starts
    from a copy of the uninterrupted run's step-3 checkpoint (what a run stopped there leaves:
    stopping itself is tested by test_resume_equals_uninterrupted_run), one launch less."""
    base = merge(TINY_RECIPE, {"model": {"backbone": {"drop_path_rate": 0.0}}, "engine": {"zero_stage": stage},
                               "scaling": {"global_batch_size": 16}, "train": {"steps": 6}})
    whole = merge(base, {"name": "whole", "train": {"checkpoint_every": 3, "keep_checkpoints": 2}})
    out = run_recipe(whole, tmp_path, nproc=first)
    assert f"global batch 16 = 8 per rank x {2 // first} accumulation x {first} ranks" in out.stderr
    elastic = merge(base, {"name": "elastic"})
    checkpoints = tmp_path / "runs/elastic/checkpoints"
    shutil.copytree(tmp_path / "runs/whole/checkpoints/step_3", checkpoints / "step_3")
    (checkpoints / "latest").write_text("step_3")
    out = run_recipe(elastic, tmp_path, nproc=second)
    if stage:
        assert f"saved by {first} ranks, resuming on {second}" in out.stderr
    assert f"resumed from step_3{'_universal' if stage else ''} at step 3" in out.stderr
    assert f"global batch 16 = 8 per rank x {2 // second} accumulation x {second} ranks" in out.stderr
    result = result_of(elastic, tmp_path)
    assert result["step"] == 6 and result["world_size"] == second and len(result["losses"]) == 3
    a, b = final_weights(whole, tmp_path), final_weights(elastic, tmp_path)
    assert sorted(a) == sorted(b)
    for key in a:
        torch.testing.assert_close(b[key], a[key], atol=1e-5, rtol=1e-4, msg=key)


def test_non_finite_loss_stops_clearly_and_keeps_the_last_checkpoint(tmp_path):
    recipe = merge(TINY_RECIPE, {"name": "diverge", "optim": {"lr": 1e30, "warmup_steps": 0, "clip_grad": 0.0},
                                 "train": {"steps": 20, "checkpoint_every": 1, "max_nonfinite_steps": 2}})
    out = run_recipe(recipe, tmp_path, nproc=1, expect_ok=False)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "consecutive non-finite losses" in out.stderr and "Traceback" not in out.stderr
    checkpoints = sorted((tmp_path / "runs/diverge/checkpoints").glob("step_*"))
    assert checkpoints, "the last good checkpoint is kept"
    assert (checkpoints[-1] / "beitdist_manifest.json").exists()
