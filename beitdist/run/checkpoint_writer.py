"""Saving a run's checkpoints (every rank's shards, rank 0's loop state, the commit, pruning) and
consolidating the final fp32 weights into `<run_dir>/final`. The directory logic itself (manifest,
`latest`, scan, prune, abandon) is `beitdist.run.checkpoints`; the engine writes its own files."""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from beitdist import plugins
from beitdist.checkpoint import NATIVE_CONFIG, save_run_weights
from beitdist.errors import RunFailedError
from beitdist.model import build_model
from beitdist.recipe import Recipe
from beitdist.run import checkpoints as ckpts
from beitdist.run.ema import ModelEma, ema_state_dict
from beitdist.run.files import write_atomic
from beitdist.run.rundir import RunDir
from beitdist.run.storage import RemoteRun

log = logging.getLogger("beitdist.train")  # the training loop's log lines keep the name users filter on


class CheckpointSaveError(RunFailedError):
    """A checkpoint could not be written (disk full, quota, I/O error). The run stops rather than
    train on without checkpoints; the half-written directory is removed and `latest` still names
    the previous complete checkpoint, which the next launch resumes from. Possibly raised by some
    ranks only (the others may be blocked in the save)."""

    all_ranks = False


class CheckpointWriter:
    """Writes checkpoints `step_N` of one run on one rank (rank 0 does the single-writer parts)."""

    def __init__(self, layout: RunDir, engine: Any, rank: int, keep: int, ema: ModelEma | None = None,
                 remote: RemoteRun | None = None, local_rank: int = 0) -> None:
        self.layout, self.engine, self.rank, self.keep = layout, engine, rank, keep
        self.ema = ema
        """The model EMA (train.ema), saved with every checkpoint before its commit."""
        self.remote, self.local_rank = remote, local_rank
        """An object-store output_dir: each checkpoint is committed there after the local commit."""

    @property
    def ckpt_dir(self) -> Path:
        return self.layout.checkpoints

    def save(self, step: int, loop_state: Callable[[], dict[str, Any]], context: Any) -> Path:
        """Write checkpoint step_N: every rank's shards, rank 0's loop state (`loop_state()`),
        then the commit (manifest and `latest`, finish_checkpoint); only then are old checkpoints
        pruned. A failed write (disk full, quota, I/O error) removes the half-written directory,
        leaves `latest` on the previous complete checkpoint and stops the run with
        CheckpointSaveError: training on without checkpoints would lose work the user believes is
        saved. Another rank blocked in the save is ended by the launcher (torchrun, Ray) when this
        one exits."""
        tag = f"step_{step}"
        path = self.layout.tag(tag)
        plugins.emit("beitdist_on_checkpoint_start", context=context, step=step)
        try:
            if self.rank == 0 or (self.remote is not None and self.local_rank == 0):
                # a leftover from a crashed save of this step (each node's own staging copy when remote)
                ckpts.discard_checkpoint(self.ckpt_dir, tag)
            dist.barrier()
            self.engine.save(self.ckpt_dir, tag, client_state={"step": step})
            if self.ema is not None:
                self.ema.save(path)
            if self.rank == 0:
                write_atomic(self.layout.state_file(tag), json.dumps(loop_state(), indent=1, default=str))
            ckpts.finish_checkpoint(self.ckpt_dir, tag)
        except (OSError, RuntimeError) as err:
            if ckpts.is_committed(self.ckpt_dir, tag):
                raise  # the checkpoint is complete; what failed came after it (a lost peer in the last barrier)
            raise CheckpointSaveError(ckpts.abandon_checkpoint(self.ckpt_dir, tag, err, remove=self.rank == 0)) from None
        if self.remote is not None:
            self._commit_remote(tag)
        self.prune(tag)
        plugins.emit("beitdist_on_checkpoint_saved", context=context, step=step, path=str(path))
        return path

    def _commit_remote(self, tag: str) -> None:
        """Every node uploads its files of `tag`, then rank 0 writes the store's manifest and
        `latest` (`beitdist.run.storage`). A failed upload stops the run like a failed local
        write: the store's `latest` still names the previous complete checkpoint."""
        assert self.remote is not None
        try:
            if self.local_rank == 0:
                self.remote.upload_checkpoint_files(tag)
            dist.barrier()
            if self.rank == 0:
                self.remote.commit_checkpoint(tag, dist.get_world_size())
                self.remote.push_run_files()
            dist.barrier()
        except Exception as err:  # noqa: BLE001 - the object store's client raises its own kinds
            try:
                kept = self.remote.complete_tags() if self.rank == 0 else []
            except Exception:  # noqa: BLE001 - the store is unreachable: what is intact is unknown here
                kept = []
            previous = next((t for t in kept if t != tag), None)
            raise CheckpointSaveError(
                f"could not upload checkpoint {tag} to {self.remote.url} ({type(err).__name__}: "
                f"{(str(err).splitlines() or [''])[0]}); "
                + (f"the store's checkpoint {previous} is intact; launch again to resume"
                   if previous else "the store holds no complete checkpoint yet; launch again")) from None

    def prune(self, newest: str) -> None:
        """Rank 0, after a complete save: keep the newest `keep` complete checkpoints (never fewer
        than one, never the one `latest` names), locally and in the object store."""
        if self.rank != 0:
            if self.remote is not None and self.local_rank == 0:
                self._drop_uploaded(newest)
            return
        deleted = ckpts.prune_checkpoints(self.ckpt_dir, self.keep, newest)
        if self.remote is not None:
            deleted = sorted(set(deleted) | set(self.remote.prune(self.keep, newest)))
        if deleted:
            log.info("removed old checkpoints %s", ", ".join(deleted))

    def _drop_uploaded(self, newest: str) -> None:
        """Another node's staging copy: its files of older checkpoints are in the store, and
        without a manifest (rank 0 writes it) they are of no use here."""
        for tag_dir in self.ckpt_dir.iterdir():
            if not tag_dir.is_dir():
                continue
            uploaded = (ckpts.TAG_PATTERN.fullmatch(tag_dir.name) and tag_dir.name != newest
                        and not (tag_dir / ckpts.MANIFEST).exists())
            if uploaded or tag_dir.name.endswith("_universal"):  # a resume's conversion: loaded, not needed again
                shutil.rmtree(tag_dir, ignore_errors=True)

    def consolidate(self, tag: str, recipe: Recipe) -> Path:
        """Rank 0: fp32 weights from the shards -> <run_dir>/final (a beitdist checkpoint). The
        shards are this run's own, which a resume unpickles in full anyway (the engines' loaders
        do), so they are trusted here; `load_model(run_dir)` is what reads them weights-only."""
        if self.remote is not None:  # the shards other nodes wrote are in the store only
            self.remote.pull_checkpoint(tag)
        state = ckpts.consolidated_state_dict(self.ckpt_dir, tag, trust_pickle=True)
        weights = self.final_weights(recipe)
        if weights == "ema":  # the trainable parameters averaged; buffers and frozen parameters as trained
            averaged = ema_state_dict(self.layout.tag(tag))
            unknown = sorted(set(averaged) - set(state))
            if unknown:
                raise RuntimeError(f"the EMA of {self.layout.tag(tag)} has parameters the model lacks: {unknown[:5]}")
            state.update(averaged)
        model = build_model(recipe.model.backbone_config(), recipe.head.name, recipe.head.options)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"consolidated weights do not fit the model: missing {missing}, unexpected {unexpected}")
        notes: dict[str, Any] = {"weights": weights}
        if recipe.train.ema.enabled:
            notes["ema"] = {"decay": recipe.train.ema.decay, "updates": self.ema.updates if self.ema else None}
        final = save_run_weights(model, self.layout.final, notes)
        if self.remote is not None:
            self.remote.upload_final(final, NATIVE_CONFIG)
        return final

    @staticmethod
    def final_weights(recipe: Recipe) -> str:
        """Which weights `final/` holds: "ema" (the averaged ones, train.ema.final) or "raw"."""
        ema = recipe.train.ema
        return "ema" if ema.enabled and ema.final == "ema" else "raw"
