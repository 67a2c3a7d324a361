"""Storage faults: a truncated or deleted newest checkpoint, a `latest` naming a checkpoint that is
gone, and a full disk in the middle of a save.

Most cases are judged on checkpoint directories built by hand (the manifest logic needs no
training); one slow end-to-end test runs `beitdist train` twice: a run whose step_9 save hits
ENOSPC (exit 1, one clear message, step_6 still loads), then, after step_6 is truncated, a resume
that falls back to step_3 with one warning and finishes.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from beitdist.run import checkpoints as ckpts
from beitdist.run import files
from tests.distributed import TINY_RECIPE, merge, result_of, run_recipe

SHARD = "mp_rank_00_model_states.pt"
OPTIM = "zero_pp_rank_0_mp_rank_00_optim_states.pt"


def fake_checkpoint(ckpt_dir: Path, step: int, commit: bool = True) -> Path:
    """A checkpoint directory shaped like DeepSpeed's (sizes 100 and 300 bytes), committed the way
    finish_checkpoint commits it."""
    tag_dir = ckpt_dir / f"step_{step}"
    tag_dir.mkdir(parents=True)
    (tag_dir / SHARD).write_bytes(b"m" * 100)
    (tag_dir / OPTIM).write_bytes(b"o" * 300)
    (tag_dir / "beitdist_state.json").write_text(json.dumps({"step": step}))
    if commit:
        ckpts.commit_checkpoint(ckpt_dir, tag_dir.name, world_size=1)
    return tag_dir


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    """step_3 and step_6 committed, in that order (so `latest` names step_6)."""
    ckpt_dir = tmp_path / "checkpoints"
    fake_checkpoint(ckpt_dir, 3)
    fake_checkpoint(ckpt_dir, 6)
    return ckpt_dir


# ------------------------------------------------------------------ manifest and scan
def test_commit_writes_manifest_and_latest_and_sorts_by_step(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    fake_checkpoint(ckpt_dir, 3)
    step_10 = fake_checkpoint(ckpt_dir, 10, commit=False)
    (step_10 / ".beitdist_state.json.tmp123").write_text("x")  # a failed write's leftover: not vouched for
    ckpts.commit_checkpoint(ckpt_dir, "step_10", world_size=1)
    fake_checkpoint(ckpt_dir, 6)
    (ckpt_dir / "step_3_universal").mkdir()  # a universal conversion is not a checkpoint of its own
    manifest = json.loads((step_10 / ckpts.MANIFEST).read_text())
    state_size = (step_10 / "beitdist_state.json").stat().st_size
    assert manifest == {"tag": "step_10", "world_size": 1,
                        "files": {"beitdist_state.json": state_size, OPTIM: 300, SHARD: 100}}
    assert ckpts.read_latest(ckpt_dir) == "step_6"  # the last one committed, whatever its step
    assert ckpts.complete_tags(ckpt_dir) == ["step_10", "step_6", "step_3"]  # by step, not by name
    assert ckpts.scan_checkpoints(ckpt_dir).broken == {}
    assert not list(ckpt_dir.glob(".*")), "the atomic writes leave no temporary file"


def test_uncommitted_checkpoint_is_not_complete(ckpt):
    fake_checkpoint(ckpt, 9, commit=False)
    problems = ckpts.checkpoint_problems(ckpt / "step_9")
    assert problems == [f"{ckpt / 'step_9'} has no {ckpts.MANIFEST} (its save did not finish, or the manifest was deleted)"]
    assert ckpts.complete_tags(ckpt, quiet=True) == ["step_6", "step_3"]


def test_unreadable_manifest_is_named(ckpt):
    (ckpt / "step_6" / ckpts.MANIFEST).write_text("{not json")
    (problem,) = ckpts.checkpoint_problems(ckpt / "step_6")
    assert problem.startswith(f"{ckpt / 'step_6' / ckpts.MANIFEST} is unreadable (JSONDecodeError: ")


def test_complete_tags_logs_each_broken_checkpoint_once(ckpt, caplog):
    (ckpt / "step_6" / SHARD).write_bytes(b"m" * 40)
    with caplog.at_level("WARNING", logger="beitdist.run.checkpoints"):
        assert ckpts.complete_tags(ckpt) == ["step_3"]
        assert ckpts.complete_tags(ckpt, quiet=True) == ["step_3"]
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping checkpoint step_6: {ckpt / 'step_6' / SHARD} is 40 bytes, expected 100 (truncated)"]


# ----------------------------------------------------------------- resume falls back
def _truncate_shard(ckpt: Path) -> str:
    path = ckpt / "step_6" / OPTIM
    with open(path, "r+b") as f:
        f.truncate(120)
    return f"{path} is 120 bytes, expected 300 (truncated)"


def _delete_file(ckpt: Path) -> str:
    (ckpt / "step_6" / SHARD).unlink()
    return f"{ckpt / 'step_6' / SHARD} is missing (the manifest lists it with 100 bytes)"


def _delete_directory(ckpt: Path) -> str:
    shutil.rmtree(ckpt / "step_6")  # `latest` still names step_6
    return f"{ckpt / 'step_6'} does not exist, though {ckpt / 'latest'} names it (deleted?)"


def _latest_names_missing_tag(ckpt: Path) -> str:
    shutil.rmtree(ckpt / "step_6")
    (ckpt / "latest").write_text("step_9")
    return f"{ckpt / 'step_9'} does not exist, though {ckpt / 'latest'} names it (deleted?)"


@pytest.mark.parametrize("fault", [_truncate_shard, _delete_file, _delete_directory, _latest_names_missing_tag],
                         ids=["truncated-shard", "deleted-file", "deleted-dir", "latest-names-missing"])
def test_resume_falls_back_to_previous_complete_checkpoint(ckpt, fault):
    why = fault(ckpt)
    point = ckpts.resume_point(ckpt)
    assert point.tag == "step_3"
    broken = "step_9" if fault is _latest_names_missing_tag else "step_6"
    assert point.warning() == (f"newest checkpoint {broken} cannot be used: {why}; resuming from the previous "
                               f"complete checkpoint step_3 ({ckpt / 'step_3'})")


def test_latest_naming_missing_tag_resumes_from_newest_complete(ckpt):
    (ckpt / "latest").write_text("step_9")
    point = ckpts.resume_point(ckpt)
    assert point.tag == "step_6" and list(point.skipped) == ["step_9"]


def test_intact_checkpoints_resume_silently_and_old_broken_ones_do_not_matter(ckpt):
    (ckpt / "step_3" / SHARD).unlink()  # older than the newest complete one: irrelevant to resume
    point = ckpts.resume_point(ckpt)
    assert point.tag == "step_6" and point.warning() is None


def test_nothing_left_starts_from_scratch_and_says_so(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    fake_checkpoint(ckpt_dir, 3)
    (ckpt_dir / "step_3" / OPTIM).write_bytes(b"")
    point = ckpts.resume_point(ckpt_dir)
    assert point.tag is None
    assert point.warning().endswith(f"no complete checkpoint is left in {ckpt_dir}, so training starts from step 0")
    assert ckpts.resume_point(tmp_path / "nowhere") == ckpts.ResumePoint(None, {}, tmp_path / "nowhere")


# ------------------------------------------------------------------------ disk full
def test_atomic_write_that_fails_keeps_old_content_and_leaves_no_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "latest"
    target.write_text("step_3")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(files.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space left on device"):
        files.write_atomic(target, "step_6")
    assert target.read_text() == "step_3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_write_error_cause_names_a_full_disk(tmp_path, monkeypatch):
    def oserror(code):
        return OSError(code, os.strerror(code))

    assert ckpts.write_error_cause(oserror(errno.ENOSPC), tmp_path) == ("No space left on device", True)
    assert ckpts.write_error_cause(oserror(errno.EDQUOT), tmp_path)[1] is True
    assert ckpts.write_error_cause(oserror(errno.EIO), tmp_path) == ("Input/output error", False)
    # torch's zip writer (DeepSpeed's default serialization) hides errno: judged by the space left
    zip_error = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    assert ckpts.write_error_cause(zip_error, tmp_path) == (
        "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534", False)
    free = 10 << 20
    monkeypatch.setattr(ckpts.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**12, 10**12 - free, free))
    assert ckpts.write_error_cause(zip_error, tmp_path, needed=1 << 20)[1] is False
    # less room than a checkpoint takes, even after another rank's cleanup freed some: a full disk
    assert ckpts.write_error_cause(zip_error, tmp_path, needed=20 << 20) == ("No space left on device", True)
    # a rank whose half-written directory rank 0 removed after its own ENOSPC says the same
    assert ckpts.write_error_cause(oserror(errno.ENOENT), tmp_path, needed=20 << 20) == ("No space left on device", True)
    assert ckpts.write_error_cause(oserror(errno.EIO), tmp_path, needed=20 << 20) == ("Input/output error", False)


def test_checkpoint_bytes_sums_the_manifest(ckpt):
    state = (ckpt / "step_6" / "beitdist_state.json").stat().st_size
    assert ckpts.checkpoint_bytes(ckpt / "step_6") == 400 + state
    assert ckpts.checkpoint_bytes(ckpt / "step_99") == 0


def test_abandoned_save_is_removed_and_latest_stays_on_previous(ckpt):
    half = fake_checkpoint(ckpt, 9, commit=False)
    (half / OPTIM).write_bytes(b"o" * 10)
    message = ckpts.abandon_checkpoint(ckpt, "step_9", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(half / OPTIM)))
    assert message == (f"could not save checkpoint step_9 to {ckpt / 'step_9'}: No space left on device; the previous "
                       "checkpoint step_6 is intact; free space and launch again to resume")
    assert not half.exists()
    assert ckpts.read_latest(ckpt) == "step_6" and ckpts.complete_tags(ckpt, quiet=True) == ["step_6", "step_3"]


def test_abandon_repoints_a_stale_latest_and_says_when_nothing_is_left(tmp_path, ckpt):
    (ckpt / "latest").write_text("step_9")  # a stale pointer to the step being rewritten
    fake_checkpoint(ckpt, 9, commit=False)
    message = ckpts.abandon_checkpoint(ckpt, "step_9", RuntimeError("[enforce fail] unexpected pos 5 vs 3"))
    assert "RuntimeError: [enforce fail] unexpected pos 5 vs 3; the previous checkpoint step_6 is intact; fix the " \
           "cause and launch again to resume" in message
    assert ckpts.read_latest(ckpt) == "step_6"

    fresh = tmp_path / "fresh"
    fake_checkpoint(fresh, 3, commit=False)
    message = ckpts.abandon_checkpoint(fresh, "step_3", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    assert message.endswith("No space left on device; there is no earlier complete checkpoint, so the next launch "
                            "starts from step 0; free space and launch again")
    assert not (fresh / "latest").exists() and not (fresh / "step_3").exists()


def test_other_ranks_report_but_leave_cleanup_to_rank_0(ckpt):
    half = fake_checkpoint(ckpt, 9, commit=False)
    message = ckpts.abandon_checkpoint(ckpt, "step_9", OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), remove=False)
    assert message == (f"could not save checkpoint step_9 to {half}: No space left on device; the previous "
                       "checkpoint step_6 is intact; free space and launch again to resume")
    assert half.exists() and ckpts.resume_point(ckpt).tag == "step_6"  # incomplete, never resumed from


def test_discarding_a_leftover_moves_latest_back(ckpt):
    ckpts.discard_checkpoint(ckpt, "step_6")
    assert not (ckpt / "step_6").exists() and ckpts.read_latest(ckpt) == "step_3"
    assert ckpts.is_committed(ckpt, "step_3") and not ckpts.is_committed(ckpt, "step_6")


# ------------------------------------------------------------------------- pruning
def test_prune_keeps_newest_and_removes_universal_copies(ckpt):
    fake_checkpoint(ckpt, 9)
    (ckpt / "step_3_universal").mkdir()
    assert ckpts.prune_checkpoints(ckpt, keep=2, newest="step_9") == ["step_3"]
    assert ckpts.complete_tags(ckpt) == ["step_9", "step_6"] and not (ckpt / "step_3_universal").exists()


def test_prune_never_runs_before_the_new_checkpoint_is_complete(ckpt):
    fake_checkpoint(ckpt, 9, commit=False)
    assert ckpts.prune_checkpoints(ckpt, keep=1, newest="step_9") == []
    assert ckpts.complete_tags(ckpt, quiet=True) == ["step_6", "step_3"]


def test_prune_never_deletes_the_only_complete_checkpoint(ckpt):
    (ckpt / "step_6" / SHARD).unlink()  # step_3 is now the only complete one
    assert ckpts.prune_checkpoints(ckpt, keep=1, newest="step_3") == []
    assert ckpts.prune_checkpoints(ckpt, keep=0, newest="step_3") == []
    assert ckpts.complete_tags(ckpt, quiet=True) == ["step_3"]


def test_prune_spares_the_checkpoint_latest_names(ckpt):
    fake_checkpoint(ckpt, 9)
    (ckpt / "latest").write_text("step_3")
    assert ckpts.prune_checkpoints(ckpt, keep=1, newest="step_9") == ["step_6"]
    assert ckpts.complete_tags(ckpt) == ["step_9", "step_3"]


# ------------------------------------------------------------------------ end to end
ENOSPC_DRIVER = """\
import errno, os, sys
from pathlib import Path
import torch

real_save = torch.save


def save_until_disk_full(obj, f, *args, **kwargs):
    # the optimizer shard of step_9 fills the disk: half of it lands, then ENOSPC
    real_save(obj, f, *args, **kwargs)
    if isinstance(f, (str, os.PathLike)) and Path(f).parent.name == "step_9" and "optim_states" in str(f):
        os.truncate(f, os.path.getsize(f) // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))


torch.save = save_until_disk_full
from beitdist.cli import main

sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_disk_full_then_truncated_newest_checkpoint_end_to_end(tmp_path):
    from beitdist import load_model
    from beitdist.run.checkpoints import consolidated_state_dict

    recipe = merge(TINY_RECIPE, {"name": "storage", "engine": {"zero_stage": 2},
                                 "train": {"steps": 9, "checkpoint_every": 3, "keep_checkpoints": 2,
                                           "log_every": 0}})
    run_dir = tmp_path / "runs" / "storage"
    ckpt = run_dir / "checkpoints"
    path = tmp_path / "storage.yaml"
    path.write_text(yaml.safe_dump(merge(recipe, {"output_dir": str(tmp_path / "runs")})))
    (tmp_path / "enospc_driver.py").write_text(ENOSPC_DRIVER)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}

    # 1. disk full while saving step_9: exit 1, one clear message, nothing half-written left
    full = subprocess.run([sys.executable, str(tmp_path / "enospc_driver.py"), "-v", "train", str(path)],
                          capture_output=True, text=True, env=env, timeout=300, cwd=tmp_path)
    assert full.returncode == 1, full.stderr[-3000:]
    assert (f"beitdist train: run failed: could not save checkpoint step_9 to {ckpt / 'step_9'}: No space left on "
            "device; the previous checkpoint step_6 is intact; free space and launch again to resume") in full.stderr
    assert "Traceback" not in full.stderr
    assert not (ckpt / "step_9").exists()
    assert ckpts.read_latest(ckpt) == "step_6" and ckpts.complete_tags(ckpt) == ["step_6", "step_3"]
    assert not list(ckpt.rglob(".*.tmp*")), "no temporary file is left behind"
    weights = consolidated_state_dict(ckpt, "step_6")
    model = load_model(run_dir, head="auto")  # a run directory without final/: its newest complete checkpoint
    assert sorted(weights) == sorted(model.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in weights.items())

    # 2. the shard of step_6 truncated on disk: resume from step_3, one warning, finish
    shard = ckpt / "step_6" / OPTIM
    expected = shard.stat().st_size
    os.truncate(shard, expected // 3)
    resumed = run_recipe(recipe, tmp_path, nproc=1)
    warning = (f"WARNING beitdist.train: newest checkpoint step_6 cannot be used: {shard} is {expected // 3} bytes, "
               f"expected {expected} (truncated); resuming from the previous complete checkpoint step_3 "
               f"({ckpt / 'step_3'})")
    assert warning in resumed.stderr.splitlines(), resumed.stderr[-3000:]
    assert [line for line in resumed.stderr.splitlines() if line.startswith("WARNING") and "step_6" in line] == [warning]
    assert "resumed from step_3 at step 3" in resumed.stderr
    result = result_of(recipe, tmp_path)
    assert result["step"] == 9 and len(result["losses"]) == 6
    assert ckpts.complete_tags(ckpt) == ["step_9", "step_6"] and ckpts.read_latest(ckpt) == "step_9"
