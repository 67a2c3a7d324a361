"""`RunDir`: the one place that spells a training run directory's layout.

    <run_dir>/
      checkpoints/            engine shards per step (`checkpoints/step_N/`, `latest`; beitdist.run.checkpoints)
        step_N/beitdist_state.json   the loop's own state and the recipe, beside the engine's files
      final/                  consolidated fp32 weights (a beitdist checkpoint)
      train_result.json       the finished run's summary (rank 0)
      progress.json           rank 0's live progress, read by the progress bar
      mlflow.db               the default MLflow store (sqlite), when tracking.uri is unset
      mlflow_run_id           the MLflow run this run directory logs to, across restarts
      mlartifacts/            the default MLflow store's artifacts (pictures, recipe, final weights)
      launch.json             when `beitdist launch` started and when Ray was up
      workers/rank_R.json     which node, host and process runs each rank (Ray)
      eval/<mode>.json        `beitdist evaluate`'s results (metrics, per class, confusion matrix)

The on-disk names are fixed: runs written by earlier versions must still resume. Other modules ask
a `RunDir` (or its class constants) instead of spelling these names; tests/test_rundir.py checks.
Light on purpose: no torch, nothing beyond pathlib.
"""

from __future__ import annotations

import os
from pathlib import Path


class RunDir:
    """The paths of one run directory (nothing is created or read on construction)."""

    CHECKPOINTS = "checkpoints"
    FINAL = "final"
    RESULT = "train_result.json"
    PROGRESS = "progress.json"
    STATE_FILE = "beitdist_state.json"
    MLFLOW_DB = "mlflow.db"
    MLFLOW_RUN_ID = "mlflow_run_id"
    MLFLOW_ARTIFACTS = "mlartifacts"
    LAUNCH = "launch.json"
    WORKERS = "workers"
    EVAL = "eval"

    MARKERS = (CHECKPOINTS, FINAL, RESULT, MLFLOW_DB, LAUNCH, PROGRESS, MLFLOW_RUN_ID)
    """Names only a training run directory holds: such a directory is never replaced
    (`beitdist.output_paths`)."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    # ----------------------------------------------------------- checkpoints
    @property
    def checkpoints(self) -> Path:
        """`checkpoints/`: one `step_N/` per saved step, and `latest`."""
        return self.path / self.CHECKPOINTS

    def tag(self, tag: str) -> Path:
        """`checkpoints/<tag>/` (a `_universal` suffix is the engine's conversion, kept as given)."""
        return self.checkpoints / tag

    def state_file(self, tag: str) -> Path:
        """The loop's state saved with checkpoint `tag` (the one beside a universal conversion)."""
        return self.tag(tag.removesuffix("_universal")) / self.STATE_FILE

    # --------------------------------------------------------------- results
    @property
    def final(self) -> Path:
        return self.path / self.FINAL

    @property
    def result_file(self) -> Path:
        return self.path / self.RESULT

    @property
    def progress_file(self) -> Path:
        return self.path / self.PROGRESS

    # -------------------------------------------------------------- tracking
    @property
    def mlflow_db(self) -> Path:
        return self.path / self.MLFLOW_DB

    @property
    def mlflow_artifacts(self) -> Path:
        return self.path / self.MLFLOW_ARTIFACTS

    @property
    def mlflow_run_id_file(self) -> Path:
        return self.path / self.MLFLOW_RUN_ID

    # ---------------------------------------------------------------- launch
    @property
    def launch_record(self) -> Path:
        return self.path / self.LAUNCH

    @property
    def workers(self) -> Path:
        return self.path / self.WORKERS

    def worker_record(self, rank: int) -> Path:
        return self.workers / f"rank_{rank}.json"

    # ------------------------------------------------------------ evaluation
    def evaluation(self, mode: str) -> Path:
        """`eval/<mode>.json`: what `beitdist evaluate` measured in that eval mode."""
        return self.path / self.EVAL / f"{mode}.json"

    # ------------------------------------------------------------ recognition
    @classmethod
    def markers(cls, path: str | os.PathLike) -> list[str]:
        """The run-directory names `path` holds, in `MARKERS` order (empty: not a run directory)."""
        path = Path(path)
        try:
            entries = {p.name for p in path.iterdir()}
        except OSError:
            return []
        return [name for name in cls.MARKERS if name in entries]
