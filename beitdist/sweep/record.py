"""What a sweep leaves behind: `sweep_result.json`, a picture of the metric against every searched
value, and one MLflow parent run holding the search space and the best trial (the trials' own
runs are nested under it, `tracking.parent_run_id`)."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from beitdist.run.files import write_atomic
from beitdist.sweep.space import Distribution, Trial
from beitdist.sweep.spec import SweepSpec

log = logging.getLogger(__name__)

RESULT_FILE = "sweep_result.json"
PICTURE_FILE = "sweep.png"
PARENT_RUN_ID_FILE = "mlflow_parent_run_id"


@dataclass(frozen=True)
class TrialOutcome:
    index: int
    name: str
    values: dict[str, Any]
    status: str
    """finished, stopped early (the scheduler), failed, or not run."""
    step: int
    metric: float
    """The last value of the sweep's metric the trial reported (NaN: none)."""
    run_dir: str
    final_dir: str | None
    error: str | None = None


def best_outcome(outcomes: Sequence[TrialOutcome], spec: SweepSpec) -> TrialOutcome | None:
    """The finished trial with the best metric (a trial stopped early has no final weights)."""
    best = None
    for outcome in outcomes:
        if outcome.status == "finished" and (best is None or spec.better(outcome.metric, best.metric)):
            best = outcome
    return best


def write_result(sweep_dir: Path, spec: SweepSpec, space: Sequence[Distribution],
                 outcomes: Sequence[TrialOutcome]) -> dict[str, Any]:
    best = best_outcome(outcomes, spec)
    summary = {"name": spec.name, "metric": spec.metric, "mode": spec.resolved_mode, "scheduler": spec.scheduler,
               "search": {d.key: {d.kind: list(d.args)} for d in space},
               "best": asdict(best) if best else None, "trials": [_plain(asdict(o)) for o in outcomes]}
    write_atomic(sweep_dir / RESULT_FILE, json.dumps(_plain(summary), indent=1))
    return summary


def _plain(value: Any) -> Any:
    """NaN as null: JSON readers other than Python's refuse NaN."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def draw(path: Path, spec: SweepSpec, space: Sequence[Distribution], outcomes: Sequence[TrialOutcome]) -> Path | None:
    """One panel per searched key: every trial's metric against its value (finished trials as
    dots, stopped ones as crosses, the best ringed); None when no trial reported the metric."""
    scored = [o for o in outcomes if not math.isnan(o.metric)]
    if not scored:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    best = best_outcome(outcomes, spec)
    fig, axes = plt.subplots(1, len(space), figsize=(4.2 * len(space), 3.6), squeeze=False)
    for ax, dist in zip(axes[0], space, strict=True):
        categorical = dist.kind in ("choice", "grid") and not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in dist.args)
        labels = [str(v) for v in dist.args] if categorical else []

        def x_of(outcome: TrialOutcome, dist: Distribution = dist, labels: list[str] = labels) -> float:
            value = outcome.values[dist.key]
            return float(labels.index(str(value))) if labels else float(value)

        for status, marker in (("finished", "o"), ("stopped early", "x"), ("failed", "s")):
            group = [o for o in scored if o.status == status]
            if group:
                ax.scatter([x_of(o) for o in group], [o.metric for o in group], marker=marker, label=status)
        if best is not None:
            ax.scatter([x_of(best)], [best.metric], s=160, facecolors="none", edgecolors="red", label="best")
        if dist.kind == "loguniform" or (not labels and dist.kind != "randint" and _spans_decades(dist)):
            ax.set_xscale("log")
        if labels:
            ax.set_xticks(range(len(labels)), labels)
        ax.set_xlabel(dist.key)
        ax.set_ylabel(f"{spec.metric} ({spec.resolved_mode})")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"sweep {spec.name}: {len(scored)} trials")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    tmp.replace(path)
    return path


def _now_ms() -> int:
    return int(time.time() * 1000)


def _spans_decades(dist: Distribution) -> bool:
    values = [float(v) for v in dist.args if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 100


class ParentRun:
    """The sweep's MLflow run: created once (its id kept in the sweep directory, so a restored
    sweep continues it), parameters = the search space and settings, closed with the best trial."""

    def __init__(self, uri: str, artifact_location: str | None, experiment: str, sweep_dir: Path) -> None:
        from mlflow import MlflowClient

        from beitdist.tracking import create_sqlite_store

        create_sqlite_store(uri)
        self.client = MlflowClient(tracking_uri=uri)
        self.id_file = sweep_dir / PARENT_RUN_ID_FILE
        experiment_obj = self.client.get_experiment_by_name(experiment)
        experiment_id = (experiment_obj.experiment_id if experiment_obj is not None
                         else self.client.create_experiment(experiment, artifact_location=artifact_location))
        existing = self._existing()
        if existing is None:
            run = self.client.create_run(experiment_id, run_name=sweep_dir.name,
                                         tags={"beitdist.sweep": str(sweep_dir.resolve())})
            self.run_id: str = run.info.run_id
            write_atomic(self.id_file, self.run_id)
        else:
            self.run_id = existing
            self.client.update_run(self.run_id, status="RUNNING")

    def _existing(self) -> str | None:
        try:
            run_id = self.id_file.read_text().strip()
            self.client.get_run(run_id)
            return run_id
        except Exception:  # noqa: BLE001 - no file, or a run the store does not have: start a new one
            return None

    def log_settings(self, spec: SweepSpec, space: Sequence[Distribution], trials: Sequence[Trial],
                     concurrent: int, per_trial: str) -> None:
        from mlflow.entities import Param

        logged = self.client.get_run(self.run_id).data.params
        params = {f"search.{d.key}": d.describe() for d in space}
        params.update({"trials": str(len(trials)), "scheduler": spec.scheduler, "metric": spec.metric,
                       "mode": spec.resolved_mode, "grace_period": str(spec.grace_period),
                       "reduction_factor": str(spec.reduction_factor), "concurrent_trials": str(concurrent),
                       "trial_resources": per_trial})
        new = [Param(k[:250], v[:6000]) for k, v in params.items() if k[:250] not in logged]
        if new:
            self.client.log_batch(self.run_id, params=new)

    def close_trials(self, outcomes: Sequence[TrialOutcome]) -> None:
        """The MLflow runs of trials that Tune ended (stopped early, failed): their processes were
        killed, so the runs say RUNNING until told otherwise."""
        from beitdist.run.rundir import RunDir

        for outcome in outcomes:
            if outcome.status not in ("stopped early", "failed"):
                continue
            try:
                run_id = RunDir(Path(outcome.run_dir)).mlflow_run_id_file.read_text().strip()
                self.client.set_tag(run_id, "beitdist.sweep_status", outcome.status)
                if self.client.get_run(run_id).info.status == "RUNNING":
                    status = "KILLED" if outcome.status == "stopped early" else "FAILED"
                    self.client.set_terminated(run_id, status=status)
            except Exception as err:  # noqa: BLE001 - a trial that never logged: nothing to close
                log.debug("no MLflow run to close for %s (%s)", outcome.name, err)

    def finish(self, summary: dict[str, Any], sweep_dir: Path, picture: Path | None, failed: bool) -> None:
        from mlflow.entities import Metric, Param

        best = summary.get("best")
        logged = self.client.get_run(self.run_id).data.params
        if best:
            params = {f"best.{k}": str(v) for k, v in best["values"].items()}
            params["best.trial"] = best["name"]
            params["best.run_dir"] = best["run_dir"]
            new = [Param(k[:250], v[:6000]) for k, v in params.items() if k[:250] not in logged]
            self.client.log_batch(self.run_id, params=new)
            if best["metric"] is not None:
                metric = Metric(f"best_{summary['metric']}", best["metric"], _now_ms(), 0)
                self.client.log_batch(self.run_id, metrics=[metric])
        counts: dict[str, int] = {}
        for trial in summary["trials"]:
            counts[trial["status"]] = counts.get(trial["status"], 0) + 1
        self.client.log_batch(self.run_id, metrics=[Metric(f"trials_{k.replace(' ', '_')}", float(v), _now_ms(), 0)
                                                    for k, v in counts.items()])
        self.client.log_artifact(self.run_id, str(sweep_dir / RESULT_FILE))
        if picture is not None:
            self.client.log_artifact(self.run_id, str(picture))
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
