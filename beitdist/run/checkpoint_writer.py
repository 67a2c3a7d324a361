"""Saving a run's checkpoints (every rank's shards, rank 0's loop state, the commit, pruning) and
consolidating the final fp32 weights into `<run_dir>/final`. The directory logic itself (manifest,
`latest`, scan, prune, abandon) is `beitdist.run.checkpoints`; the engine writes its own files."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from beitdist import plugins
from beitdist.checkpoint import save_run_weights
from beitdist.errors import RunFailedError
from beitdist.model import build_model
from beitdist.recipe import Recipe
from beitdist.run import checkpoints as ckpts
from beitdist.run.ema import ModelEma, ema_state_dict
from beitdist.run.files import write_atomic
from beitdist.run.rundir import RunDir

log = logging.getLogger("beitdist.train")  # the training loop's log lines keep the name users filter on


class CheckpointSaveError(RunFailedError):
    """A checkpoint could not be written (disk full, quota, I/O error). The run stops rather than
    train on without checkpoints; the half-written directory is removed and `latest` still names
    the previous complete checkpoint, which the next launch resumes from. Possibly raised by some
    ranks only (the others may be blocked in the save)."""

    all_ranks = False


class CheckpointWriter:
    """Writes checkpoints `step_N` of one run on one rank (rank 0 does the single-writer parts)."""

    def __init__(self, layout: RunDir, engine: Any, rank: int, keep: int, ema: ModelEma | None = None) -> None:
        self.layout, self.engine, self.rank, self.keep = layout, engine, rank, keep
        self.ema = ema
        """The model EMA (train.ema), saved with every checkpoint before its commit."""

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
            if self.rank == 0:
                ckpts.discard_checkpoint(self.ckpt_dir, tag)  # a leftover from a crashed save of this step
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
        self.prune(tag)
        plugins.emit("beitdist_on_checkpoint_saved", context=context, step=step, path=str(path))
        return path

    def prune(self, newest: str) -> None:
        """Rank 0, after a complete save: keep the newest `keep` complete checkpoints (never fewer
        than one, never the one `latest` names)."""
        if self.rank != 0:
            return
        deleted = ckpts.prune_checkpoints(self.ckpt_dir, self.keep, newest)
        if deleted:
            log.info("removed old checkpoints %s", ", ".join(deleted))

    def consolidate(self, tag: str, recipe: Recipe) -> Path:
        """Rank 0: fp32 weights from the shards -> <run_dir>/final (a beitdist checkpoint). The
        shards are this run's own, which a resume unpickles in full anyway (the engines' loaders
        do), so they are trusted here; `load_model(run_dir)` is what reads them weights-only."""
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
        return save_run_weights(model, self.layout.final, notes)

    @staticmethod
    def final_weights(recipe: Recipe) -> str:
        """Which weights `final/` holds: "ema" (the averaged ones, train.ema.final) or "raw"."""
        ema = recipe.train.ema
        return "ema" if ema.enabled and ema.final == "ema" else "raw"
