"""A run directory in object storage (`output_dir: s3://bucket/prefix`), staged on each node's disk.

Why: on Kubernetes and cloud VMs the nodes share no file system, so no rank can read another
node's shards from `output_dir`, and a node that is gone takes its disk with it. Each node
therefore writes the run directory in a local staging copy (`storage.cache_dir`, by default
~/.cache/beitdist/runs/<protocol>/<bucket>/<prefix>/<name>), exactly as it writes a local run, and
the object store holds the run's truth:

- a checkpoint: every rank writes its files locally (the engine's shards, the EMA pieces, rank 0's
  loop state); after the local commit the first rank of each node uploads its node's files; then
  rank 0 lists what arrived, writes the manifest (files and sizes, from the store's own listing)
  and only then `latest`. A checkpoint without a manifest is never resumed, so an upload cut
  anywhere (a dead node, a full bucket) leaves `latest` on the previous complete checkpoint, as on
  a local disk (`beitdist.run.checkpoints`);
- a resume (a relaunch, Ray's restart, a new node with an empty cache): the first rank of each
  node downloads the newest checkpoint that is complete in the store, and drops local checkpoints
  the store never committed, so every rank resumes the same step;
- the end: rank 0 downloads the shards of the last checkpoint that other nodes wrote, consolidates
  them, and uploads `final/` (weights first, its config last: `load_model` needs the config) and
  `train_result.json`. Pruning removes a checkpoint's manifest first, then its files;
- the default MLflow store (the sqlite file, its run id and artifacts) and `eval/` are uploaded by
  rank 0 with each checkpoint and at the end, and downloaded on a node whose staging copy logs to
  another MLflow run (or none), so the run's history continues where the store has it.

The client is fsspec (s3fs for `s3://`, the `s3` extra); `storage.options` are its keyword
arguments (S3-compatible stores: `endpoint_url`, `key`, `secret`, `client_kwargs`), or s3fs reads
the usual AWS_* variables.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from beitdist.data.remote import filesystem, is_remote
from beitdist.errors import InputError
from beitdist.run.checkpoints import LATEST, MANIFEST, TAG_PATTERN, discard_checkpoint, scan_checkpoints
from beitdist.run.files import write_atomic
from beitdist.run.rundir import RunDir

log = logging.getLogger("beitdist.train")

DEFAULT_CACHE = "~/.cache/beitdist/runs"


def staging_dir(output_dir: str, name: str, cache_dir: str | None) -> Path:
    """The local copy of run `name` of a remote `output_dir` (the same on every node)."""
    protocol, rest = output_dir.split("://", 1)
    parts = [part for part in rest.split("/") if part not in ("", ".", "..")]
    return Path(cache_dir or DEFAULT_CACHE).expanduser().resolve() / protocol.lower() / Path(*parts) / name


class RemoteRun:
    """The object-store side of one run directory; `local` is this node's staging copy."""

    def __init__(self, url: str, local: Path, options: Mapping[str, Any] | None = None) -> None:
        if not is_remote(url):
            raise ValueError(f"{url}: not an object-store URL")
        self.url = url.rstrip("/")
        self.fs, self.root = filesystem(self.url, options)
        self.local = RunDir(local)

    def __repr__(self) -> str:
        return f"RemoteRun({self.url!r})"

    def _path(self, relative: str) -> str:
        return f"{self.root}/{relative}" if relative else self.root

    def _relative(self, path: Path) -> str:
        return path.relative_to(self.local.path).as_posix()

    # ------------------------------------------------------------- reading
    def _read_text(self, relative: str) -> str | None:
        try:
            return bytes(self.fs.cat_file(self._path(relative))).decode("utf-8")
        except FileNotFoundError:
            return None

    def _sizes(self, relative: str) -> dict[str, int]:
        """Every object under `relative`, by path relative to it, with its size."""
        prefix = self._path(relative)
        try:
            found = self.fs.find(prefix, detail=True)
        except FileNotFoundError:
            return {}
        return {path[len(prefix):].lstrip("/"): int(info.get("size") or 0) for path, info in found.items()
                if info.get("type", "file") != "directory"}

    def complete_tags(self) -> list[str]:
        """Checkpoints complete in the store (manifest present, every listed object there with
        its size), newest first."""
        self.fs.invalidate_cache()
        try:
            names = [Path(p).name for p in self.fs.ls(self._path(RunDir.CHECKPOINTS), detail=False)]
        except FileNotFoundError:
            return []
        tags = sorted((n for n in names if TAG_PATTERN.fullmatch(n)), key=lambda t: int(t.split("_")[1]), reverse=True)
        complete = []
        for tag in tags:
            text = self._read_text(f"{RunDir.CHECKPOINTS}/{tag}/{MANIFEST}")
            if text is None:
                continue
            try:
                expected = {str(k): int(v) for k, v in json.loads(text)["files"].items()}
            except (ValueError, KeyError, TypeError, AttributeError):
                log.warning("%s/%s/%s/%s is unreadable; that checkpoint is skipped", self.url, RunDir.CHECKPOINTS,
                            tag, MANIFEST)
                continue
            present = self._sizes(f"{RunDir.CHECKPOINTS}/{tag}")
            if all(present.get(name) == size for name, size in expected.items()):
                complete.append(tag)
        return complete

    def _download(self, relative: str, size: int | None = None) -> None:
        """One object to the same place in the staging copy (kept when already there with its
        size), through a hidden temporary file: a cut download never looks complete."""
        target = self.local.path / relative
        if size is not None and target.is_file() and target.stat().st_size == size:
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.{os.getpid()}.part")
        self.fs.get_file(self._path(relative), str(partial))
        os.replace(partial, target)

    def pull_checkpoint(self, tag: str) -> None:
        """Every file of checkpoint `tag` from the store, then its manifest and `latest` locally."""
        base = f"{RunDir.CHECKPOINTS}/{tag}"
        text = self._read_text(f"{base}/{MANIFEST}")
        if text is None:
            raise FileNotFoundError(f"{self.url}/{base}/{MANIFEST}")
        for name, size in json.loads(text)["files"].items():
            self._download(f"{base}/{name}", int(size))
        write_atomic(self.local.tag(tag) / MANIFEST, text)

    def pull_resume_point(self) -> str | None:
        """Before a resume (the first rank of each node): the newest checkpoint complete in the
        store, and the run's result when it finished. Local checkpoints the store does not hold
        complete (a save cut between the local and the remote commit, or another run's cache) are
        dropped, so every node resumes the same step."""
        remote = self.complete_tags()
        local = scan_checkpoints(self.local.checkpoints)
        for tag in local.complete:
            if tag not in remote:
                log.info("dropping %s from the staging copy: %s holds no complete copy of it", tag, self.url)
                discard_checkpoint(self.local.checkpoints, tag)
        self.pull_run_files()
        result = self._read_text(RunDir.RESULT)
        if result is not None:
            self.local.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.local.result_file, result)
        if not remote:
            return None
        newest = remote[0]
        self.pull_checkpoint(newest)
        write_atomic(self.local.checkpoints / LATEST, newest)
        log.info("resume point %s downloaded from %s", newest, self.url)
        return newest

    def pull_run_files(self) -> None:
        """The default MLflow store (sqlite file, run id, artifacts) and evaluations, when the
        store's MLflow run is not the one this staging copy already logs to (a new node, an empty
        cache, or a store a preflight created empty): the run's history continues from the store."""
        remote_id = self._read_text(RunDir.MLFLOW_RUN_ID)
        local_id = self.local.mlflow_run_id_file.read_text() if self.local.mlflow_run_id_file.exists() else None
        if remote_id is not None and remote_id != local_id:
            self._download(RunDir.MLFLOW_DB)
            write_atomic(self.local.mlflow_run_id_file, remote_id)
        for folder in (RunDir.MLFLOW_ARTIFACTS, RunDir.EVAL):
            for name, size in self._sizes(folder).items():
                self._download(f"{folder}/{name}", size)

    # ------------------------------------------------------------- writing
    def push_run_files(self) -> None:
        """Rank 0: the default MLflow store (a consistent snapshot of the sqlite file, taken with
        sqlite's backup API while the tracking thread may write), its run id and artifacts, and
        the evaluations; files already in the store with their size are not sent again."""
        database = self.local.mlflow_db
        if database.is_file():
            snapshot = database.with_name(f".{database.name}.{os.getpid()}.snapshot")
            try:
                with contextlib.closing(sqlite3.connect(database)) as source, \
                        contextlib.closing(sqlite3.connect(snapshot)) as copy:
                    source.backup(copy)
                self.fs.put_file(str(snapshot), self._path(RunDir.MLFLOW_DB))
            finally:
                snapshot.unlink(missing_ok=True)
        if self.local.mlflow_run_id_file.is_file():
            self.upload_file(self.local.mlflow_run_id_file)
        for folder in (self.local.mlflow_artifacts, self.local.path / RunDir.EVAL):
            if not folder.is_dir():
                continue
            present = self._sizes(folder.name)
            for path in sorted(folder.rglob("*")):
                if path.is_file() and present.get(path.relative_to(folder).as_posix()) != path.stat().st_size:
                    self.upload_file(path)

    def upload_checkpoint_files(self, tag: str) -> None:
        """This node's files of checkpoint `tag` (not its manifest, which only rank 0 writes)."""
        tag_dir = self.local.tag(tag)
        for path in sorted(tag_dir.rglob("*")):
            if path.is_file() and path.name != MANIFEST and not path.name.startswith("."):
                self.fs.put_file(str(path), self._path(self._relative(path)))

    def commit_checkpoint(self, tag: str, world_size: int) -> None:
        """Rank 0, after every node uploaded: the manifest from the store's own listing, then `latest`."""
        base = f"{RunDir.CHECKPOINTS}/{tag}"
        self.fs.invalidate_cache()
        files = {name: size for name, size in sorted(self._sizes(base).items()) if name != MANIFEST}
        manifest = json.dumps({"tag": tag, "files": files, "world_size": world_size}, indent=1)
        self.fs.pipe_file(self._path(f"{base}/{MANIFEST}"), manifest.encode())
        self.fs.pipe_file(self._path(f"{RunDir.CHECKPOINTS}/{LATEST}"), tag.encode())

    def prune(self, keep: int, newest: str) -> list[str]:
        """Complete checkpoints beyond the newest `keep` (never `newest`): manifest first."""
        deleted = []
        for tag in self.complete_tags()[max(keep, 1):]:
            if tag == newest:
                continue
            base = self._path(f"{RunDir.CHECKPOINTS}/{tag}")
            self.fs.rm_file(f"{base}/{MANIFEST}")
            self.fs.rm(base, recursive=True)
            deleted.append(tag)
        return deleted

    def upload_file(self, path: Path) -> None:
        self.fs.put_file(str(path), self._path(self._relative(path)))

    def upload_final(self, final_dir: Path, config_name: str) -> None:
        """`final/`, its config last (what makes it a checkpoint to `load_model`)."""
        files = sorted((p for p in final_dir.rglob("*") if p.is_file()), key=lambda p: p.name == config_name)
        for path in files:
            self.upload_file(path)

    def probe(self) -> None:
        """Write and delete one object: the store, the bucket and the credentials work."""
        probe = self._path(f".beitdist-probe-{os.getpid()}")
        try:
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)
        except Exception as err:  # noqa: BLE001 - botocore, aiohttp and fsspec raise their own kinds
            raise InputError(f"output_dir: cannot write to {self.url} ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''}); check the bucket, "
                             f"storage.options (endpoint_url, key, secret) or the AWS_* variables") from None
