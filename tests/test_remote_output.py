"""A run kept in object storage (`output_dir: s3://...`) against an S3-compatible server (moto's,
started by the test on 127.0.0.1): checkpoints committed in the store (manifest from the store's
listing, `latest` last), a run killed mid-way resumed on a "new node" (an empty staging cache) to
the weights of an uninterrupted run, and nothing written outside the bucket but the caches."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

from beitdist.preflight import PreflightError, check_remote_output
from beitdist.recipe import parse_recipe
from beitdist.run.checkpoints import MANIFEST, commit_checkpoint, complete_tags
from beitdist.run.storage import RemoteRun, staging_dir
from tests.distributed import TINY_RECIPE, child_pids, merge, progress_step, result_of, run_recipe, start_torchrun
from tests.test_remote_data import BUCKET, s3  # noqa: F401 - the moto server fixture

pytest.importorskip("s3fs")


def _fake_checkpoint(run_dir: Path, tag: str, payload: bytes) -> None:
    tag_dir = run_dir / "checkpoints" / tag
    (tag_dir / "beitdist_ema").mkdir(parents=True)
    (tag_dir / "shard.pt").write_bytes(payload)
    (tag_dir / "beitdist_ema" / "rank_00000.safetensors").write_bytes(payload[::-1])
    commit_checkpoint(run_dir / "checkpoints", tag, 1)


def test_commit_resume_point_and_prune_in_the_store(s3, tmp_path):
    options, client = s3
    url = f"s3://{BUCKET}/unit/run"
    node_a = RemoteRun(url, tmp_path / "a", options)
    for step, payload in ((1, b"one"), (2, b"two!"), (3, b"three")):
        tag = f"step_{step}"
        _fake_checkpoint(tmp_path / "a", tag, payload)
        node_a.upload_checkpoint_files(tag)
        if step < 3:  # step 3: uploaded, but the run died before rank 0's commit
            node_a.commit_checkpoint(tag, 1)
    assert node_a.complete_tags() == ["step_2", "step_1"]
    latest = client.get_object(Bucket=BUCKET, Key="unit/run/checkpoints/latest")["Body"].read()
    assert latest == b"step_2"
    manifest = json.loads(client.get_object(Bucket=BUCKET, Key=f"unit/run/checkpoints/step_2/{MANIFEST}")["Body"].read())
    assert manifest["files"] == {"beitdist_ema/rank_00000.safetensors": 4, "shard.pt": 4}  # the store's listing
    # a node with the local step_3 (complete locally, never committed to the store) drops it and
    # resumes the store's newest, as a new node with an empty cache does
    assert node_a.pull_resume_point() == "step_2"
    assert complete_tags(tmp_path / "a" / "checkpoints", quiet=True) == ["step_2", "step_1"]
    node_b = RemoteRun(url, tmp_path / "b", options)
    assert node_b.pull_resume_point() == "step_2"
    assert (tmp_path / "b/checkpoints/step_2/shard.pt").read_bytes() == b"two!"
    assert (tmp_path / "b/checkpoints/latest").read_text() == "step_2"
    assert complete_tags(tmp_path / "b" / "checkpoints", quiet=True) == ["step_2"]
    # a truncated object makes its checkpoint incomplete: the previous one is the resume point
    client.put_object(Bucket=BUCKET, Key="unit/run/checkpoints/step_2/shard.pt", Body=b"tw")
    assert node_b.complete_tags() == ["step_1"]
    node_a.commit_checkpoint("step_3", 1)
    assert node_a.prune(1, "step_3") == ["step_1"]
    assert node_a.complete_tags() == ["step_3"]


def test_an_unreachable_store_is_one_line_before_any_compute(s3, tmp_path):
    options, _ = s3
    recipe = parse_recipe(merge(TINY_RECIPE, {"output_dir": "s3://no-such-bucket/runs",
                                              "storage": {"options": options, "cache_dir": str(tmp_path)}}),
                          plugins=False)
    with pytest.raises(PreflightError, match=r"output_dir: cannot write to s3://no-such-bucket/runs/tiny \(.*\); "
                                             r"check the bucket, storage.options"):
        check_remote_output(recipe)
    assert staging_dir("s3://b/x/../y", "run", str(tmp_path)) == tmp_path.resolve() / "s3/b/x/y/run"



@pytest.mark.slow
def test_a_killed_run_resumes_from_the_store_on_a_new_node(s3, tmp_path):
    options, client = s3
    options = {**options, "secret": SECRET}  # moto takes any secret; none may be recorded
    base = merge(TINY_RECIPE, {"engine": {"zero_stage": 2},
                               "train": {"steps": 60, "checkpoint_every": 20, "keep_checkpoints": 2, "log_every": 0}})
    reference = merge(base, {"name": "reference"})
    run_recipe(reference, tmp_path)

    remote = merge(base, {"name": "remote", "output_dir": f"s3://{BUCKET}/runs", "tracking": {"enabled": True},
                          "storage": {"options": options, "cache_dir": str(tmp_path / "cache")}})
    work = tmp_path / "work"  # the commands' working directory: nothing may be written there
    work.mkdir()
    path = tmp_path / "remote.yaml"
    path.write_text(yaml.safe_dump(remote))
    staging = parse_recipe(remote, plugins=False).run_dir
    torchrun = start_torchrun(path, cwd=work)
    try:
        deadline = time.monotonic() + 300
        while progress_step(staging) < 22 and torchrun.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        ranks = child_pids(torchrun.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[0], signal.SIGKILL)
        _, err = torchrun.communicate(timeout=240)
    finally:
        if torchrun.poll() is None:
            torchrun.kill()
    assert torchrun.returncode != 0, err[-3000:]
    store = RemoteRun(f"s3://{BUCKET}/runs/remote", tmp_path / "unused", options)
    committed = store.complete_tags()
    assert committed and committed[0] in ("step_20", "step_40"), committed

    # a "new node": the staging cache is empty; everything it needs comes from the store
    shutil.rmtree(tmp_path / "cache")
    out = run_recipe(remote, tmp_path)
    assert f"resumed from {committed[0]} at step {committed[0].split('_')[1]}" in out.stderr
    assert store.complete_tags() == ["step_60", "step_40"]  # keep_checkpoints: 2, in the store too
    assert client.get_object(Bucket=BUCKET, Key="runs/remote/checkpoints/latest")["Body"].read() == b"step_60"
    result = json.loads(client.get_object(Bucket=BUCKET, Key="runs/remote/train_result.json")["Body"].read())
    assert result["step"] == 60 and result["losses"] == pytest.approx(
        result_of(reference, tmp_path)["losses"][int(committed[0].split("_")[1]):], abs=1e-6)
    final = load_safetensors(client.get_object(Bucket=BUCKET, Key="runs/remote/final/model.safetensors")["Body"].read())
    config = json.load(io.BytesIO(client.get_object(Bucket=BUCKET, Key="runs/remote/final/beitdist_config.json")["Body"].read()))
    assert config["format"] == "beitdist"
    expected = load_file(str(tmp_path / "runs/reference/final/model.safetensors"))
    assert sorted(final) == sorted(expected)
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, atol=1e-6, rtol=0, msg=key)
    assert list(work.iterdir()) == []  # nothing outside the bucket but the caches
    _check_mlflow_in_store(client, tmp_path / "downloaded")
    _check_no_secret_recorded(client, tmp_path, path)


SECRET = "s3cr3t-of-the-remote-test"


def _check_no_secret_recorded(client, tmp_path: Path, recipe_file: Path) -> None:
    """The store's secret is in the recipe file the user wrote and nowhere the run wrote: not in
    the store's objects (checkpoints' state, mlflow.db with its params and recipe.yaml), not in
    the nodes' caches."""
    leaks = [f"s3://{BUCKET}/{obj['Key']}" for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
             for obj in page.get("Contents", [])
             if SECRET.encode() in client.get_object(Bucket=BUCKET, Key=obj["Key"])["Body"].read()]
    leaks += [str(p) for p in tmp_path.rglob("*") if p.is_file() and p != recipe_file
              and SECRET.encode() in p.read_bytes()]
    assert leaks == []


def _check_mlflow_in_store(client, where: Path) -> None:
    """The default MLflow store went to the bucket and continued on the new node: one run,
    FINISHED, every step's loss once, the final weights among its artifacts."""
    from mlflow import MlflowClient

    where.mkdir()
    (where / "mlflow.db").write_bytes(client.get_object(Bucket=BUCKET, Key="runs/remote/mlflow.db")["Body"].read())
    mlflow = MlflowClient(f"sqlite:///{where / 'mlflow.db'}")
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("beitdist").experiment_id])
    assert run.info.status == "FINISHED"
    run_id = client.get_object(Bucket=BUCKET, Key="runs/remote/mlflow_run_id")["Body"].read().decode()
    assert run.info.run_id == run_id
    steps = sorted(m.step for m in mlflow.get_metric_history(run_id, "loss"))
    assert steps == list(range(1, 61)), steps
    keys = {o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix="runs/remote/mlartifacts/")["Contents"]}
    assert any(k.endswith(f"{run_id}/artifacts/final/model.safetensors") for k in keys), sorted(keys)[:20]


def test_only_a_staging_copy_has_its_uploaded_files_dropped(s3, tmp_path):
    """A local output_dir (possibly shared by the nodes) is never pruned by another rank than 0;
    a node's staging copy of an object-store run drops what the store holds (shards of older
    checkpoints without a manifest here, a resume's `_universal` conversion)."""
    from beitdist.run.checkpoint_writer import CheckpointWriter
    from beitdist.run.rundir import RunDir

    def populate(run_dir: Path) -> set[str]:
        ckpt = run_dir / "checkpoints"
        for tag in ("step_10", "step_20", "step_20_universal", "step_30"):
            (ckpt / tag).mkdir(parents=True)
            (ckpt / tag / "shard.pt").write_bytes(b"x")
        (ckpt / "step_10" / MANIFEST).write_text("{}")  # committed on this file system
        return {p.name for p in ckpt.iterdir()}

    options, _ = s3
    local = tmp_path / "local"
    before = populate(local)
    for rank, local_rank in ((1, 0), (1, 1), (3, 0)):
        CheckpointWriter(RunDir(local), engine=None, rank=rank, keep=1, local_rank=local_rank).prune("step_30")
    assert {p.name for p in (local / "checkpoints").iterdir()} == before
    assert all((local / "checkpoints" / tag / "shard.pt").exists() for tag in before)

    staging = tmp_path / "staging"
    populate(staging)
    remote = RemoteRun(f"s3://{BUCKET}/runs/drop", staging, options)
    CheckpointWriter(RunDir(staging), engine=None, rank=1, keep=1, remote=remote, local_rank=0).prune("step_30")
    assert sorted(p.name for p in (staging / "checkpoints").iterdir()) == ["step_10", "step_30"]
