"""`beitdist.load_model(run_dir)` consolidates a training checkpoint (DeepSpeed's ZeRO shards, or
fairscale's model file) without unpickling anything but weights: a run directory may come from
anyone, and DeepSpeed's own reader would run the code a crafted shard carries. Without
`trust_pickle` such a file is refused with a CheckpointError naming it, and its code never runs;
a normal run directory still loads.

The fast cases build ZeRO-0 and fairscale checkpoints by hand (one model file each); the slow case
trains a tiny ZeRO-2 run (one process) and plants the pickle in each of its two kinds of shard.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import beitdist
from beitdist.run import checkpoints as ckpts
from beitdist.engines.fairscale import checkpoints as fairscale_checkpoints
from tests.distributed import TINY_RECIPE, merge, run_recipe


class Gadget:
    """Unpickling it runs os.mkdir(marker): stands for any code a crafted checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def _tiny_model() -> beitdist.BeitForTask:
    from beitdist.recipe import HeadSection, ModelSection
    from beitdist.schema import parse

    model = parse(ModelSection, TINY_RECIPE["model"], "model")
    head = parse(HeadSection, TINY_RECIPE["head"], "head")
    return beitdist.build_model(model.backbone_config(), head.name, head.options)


def _hand_made_run(run_dir: Path, model_file: str, extra: dict | None = None) -> Path:
    """A run directory whose only checkpoint holds one model file (ZeRO-0's, or fairscale's),
    with `extra` entries pickled beside the weights; committed like a real save."""
    tag_dir = run_dir / "checkpoints" / "step_2"
    tag_dir.mkdir(parents=True)
    torch.manual_seed(0)
    model = _tiny_model()
    torch.save({"module": model.state_dict(), "world_size": 1, "mode": "oss", **(extra or {})}, tag_dir / model_file)
    (tag_dir / "beitdist_state.json").write_text(json.dumps({"step": 2, "recipe": TINY_RECIPE}))
    ckpts.commit_checkpoint(tag_dir.parent, "step_2", world_size=1)
    return tag_dir / model_file


@pytest.mark.parametrize("model_file", ["mp_rank_00_model_states.pt", fairscale_checkpoints.MODEL_FILE],
                         ids=["deepspeed-zero0", "fairscale"])
def test_a_pickled_gadget_is_refused_and_never_runs(tmp_path, model_file):
    marker = tmp_path / "gadget-ran"
    path = _hand_made_run(tmp_path / "run", model_file, {"gadget": Gadget(marker)})
    with pytest.raises(beitdist.CheckpointError) as info:
        beitdist.load_model(tmp_path / "run", head="auto")
    assert str(info.value).startswith(f"{path}: refused to unpickle arbitrary objects")
    assert "trust_pickle=True" in str(info.value)
    assert not marker.exists(), "the checkpoint's code ran"
    # the caller's own decision: with trust_pickle the file is unpickled as it is (the gadget runs)
    beitdist.load_model(tmp_path / "run", head="auto", trust_pickle=True)
    assert marker.exists()


@pytest.mark.parametrize("model_file", ["mp_rank_00_model_states.pt", fairscale_checkpoints.MODEL_FILE],
                         ids=["deepspeed-zero0", "fairscale"])
def test_a_normal_checkpoint_loads_without_trust_pickle(tmp_path, model_file):
    _hand_made_run(tmp_path / "run", model_file)
    torch.manual_seed(0)
    expected = _tiny_model().state_dict()
    loaded = beitdist.load_model(tmp_path / "run", head="auto").state_dict()
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(loaded[key], value.float() if value.is_floating_point() else value, msg=key)


# ------------------------------------------------------------------------ a real ZeRO-2 run
@pytest.fixture(scope="module")
def zero2_run(tmp_path_factory) -> Path:
    """A tiny ZeRO-2 run (one process, 2 steps, one checkpoint) without its final/ directory, so
    that loading the run consolidates the checkpoint's shards."""
    tmp_path = tmp_path_factory.mktemp("zero2")
    recipe = merge(TINY_RECIPE, {"name": "zero2", "engine": {"zero_stage": 2},
                                 "train": {"steps": 2, "checkpoint_every": 2, "log_every": 0}})
    run_recipe(recipe, tmp_path, nproc=1)
    run_dir = tmp_path / "runs" / "zero2"
    shutil.move(run_dir / "final", tmp_path / "final")
    return run_dir


def _plant(tag_dir: Path, pattern: str, gadget: Gadget) -> Path:
    """Add the gadget to the one shard matching `pattern`, then recommit (a complete checkpoint)."""
    (path,) = tag_dir.glob(pattern)
    state = torch.load(path, map_location="cpu", weights_only=False)
    torch.save({**state, "gadget": gadget}, path)
    ckpts.commit_checkpoint(tag_dir.parent, tag_dir.name, world_size=1)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("pattern", ["*model_states.pt", "*optim_states.pt"])
def test_zero2_run_directory_loads_safely_and_refuses_a_planted_gadget(zero2_run, tmp_path, pattern):
    final = beitdist.load_model(zero2_run.parent.parent / "final", head="auto").state_dict()
    model = beitdist.load_model(zero2_run, head="auto")  # consolidates step_2, no trust_pickle
    assert sorted(model.state_dict()) == sorted(final)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in final.items())

    run_dir = tmp_path / "run"
    shutil.copytree(zero2_run, run_dir)
    marker = tmp_path / "gadget-ran"
    path = _plant(run_dir / "checkpoints" / "step_2", pattern, Gadget(marker))
    with pytest.raises(beitdist.CheckpointError) as info:
        beitdist.load_model(run_dir, head="auto")
    assert str(info.value).startswith(f"{path}: refused to unpickle arbitrary objects"), str(info.value)
    assert not marker.exists(), "the shard's code ran"
