"""The sweep on Ray Tune: every trial a whole beitdist run under Ray Train, compared and stopped
early on the recipe's validation metric, restorable after a Ctrl-C or a crashed driver.

Layout, under `<output_dir>/<sweep name>/`:

    trial_000/ ...            each trial's run directory (checkpoints, final/, train_result.json)
    tune/                     Ray Tune's experiment state (what `Tuner.restore` reads)
    sweep.json                the trials this sweep runs (a changed search space is refused)
    mlflow.db                 the sweep's MLflow store, unless tracking.uri names one
    sweep_result.json, sweep.png

A trial that Tune runs again after a restore resumes from its own checkpoints (beitdist's resume),
and one that had already finished reports its result without training.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from beitdist.recipe import Recipe, parse_recipe
from beitdist.run.files import write_atomic
from beitdist.run.rundir import RunDir
from beitdist.sweep.packing import (
    Packing,
    cluster_nodes,
    driver_resources,
    largest,
    pack,
    this_machine,
    trial_resources,
)
from beitdist.sweep.record import ParentRun, TrialOutcome, best_outcome, draw, write_result
from beitdist.sweep.space import Distribution, Trial, check_space, parse_space, sample_trials, with_values
from beitdist.sweep.spec import SweepError, SweepSpec, with_defaults

log = logging.getLogger(__name__)

TUNE_DIR = "tune"
TRIALS_FILE = "sweep.json"
MAX_PLANNED = 64
"""Distinct trial shapes planned one by one; a larger sweep repeats the shapes of its first ones."""


@dataclass(frozen=True)
class TrialContext:
    """What every trial's driver needs, sent once through Ray's object store (it holds the whole
    recipe, credentials included)."""

    data: dict[str, Any]
    sweep_dir: str
    tracking_uri: str | None
    parent_run_id: str | None
    per_worker: dict[str, float]
    use_gpu: bool
    metric: str
    verbose: bool

    def trial_data(self, trial: Trial) -> dict[str, Any]:
        """The trial's recipe mapping: its values, its run directory in the sweep, its MLflow run
        nested under the sweep's, its workers' reserved resources."""
        data = with_values(self.data, trial.values)
        data["output_dir"], data["name"] = self.sweep_dir, trial.name
        tracking = dict(data.get("tracking") or {})
        if self.tracking_uri is not None:
            tracking["uri"] = self.tracking_uri
        tracking["parent_run_id"] = self.parent_run_id
        data["tracking"] = tracking
        data["scaling"] = {**dict(data.get("scaling") or {}), "resources_per_worker": dict(self.per_worker)}
        return data


@dataclass(frozen=True)
class SweepPlan:
    recipe: Recipe
    data: dict[str, Any]
    spec: SweepSpec
    space: list[Distribution]
    trials: list[Trial]
    packing: Packing
    use_gpu: bool

    @property
    def sweep_dir(self) -> Path:
        return Path(self.recipe.output_dir) / str(self.spec.name)

    def tracking_uri(self) -> str | None:
        """The trials' and the parent run's MLflow store: the recipe's, else one sqlite file for the
        whole sweep (nesting needs the parent and its children in one store)."""
        if not self.recipe.tracking.enabled:
            return None
        return self.recipe.tracking.uri or f"sqlite:///{self.sweep_dir / RunDir.MLFLOW_DB}"

    def describe(self) -> str:
        spec, resources = self.spec, self.packing.resources
        scheduler = (f"ASHA on {spec.metric} ({spec.resolved_mode}), grace {spec.grace_period} steps, keeps "
                     f"1/{spec.reduction_factor} per rung" if spec.scheduler == "asha"
                     else f"none (every trial runs {self.recipe.train.steps} steps), best by {spec.metric} "
                          f"({spec.resolved_mode})")
        lines = [f"sweep          {spec.name} -> {self.sweep_dir} ({len(self.trials)} trials of "
                 f"{self.recipe.train.steps} steps, evaluated every {self.recipe.train.eval_every})",
                 f"scheduler      {scheduler}",
                 *(f"search         {d.key}: {d.describe()}" for d in self.space),
                 f"each trial     {resources.describe()} (plan: {resources.planned_gib:.2f} GiB per rank "
                 f"on the {'GPU' if self.use_gpu else 'host'})",
                 f"cluster        {self.packing.describe_cluster()} -> {self.packing.concurrent} trial"
                 f"{'s' if self.packing.concurrent > 1 else ''} at once"]
        lines += [f"  {t.name}    {t.describe()}" for t in self.trials]
        return "\n".join(lines)


@dataclass(frozen=True)
class CheckedSweep:
    """What `check_sweep` accepted: the recipe (absolute output_dir), its mapping, the settings with
    their defaults, the space and the sampled trials."""

    recipe: Recipe
    data: dict[str, Any]
    spec: SweepSpec
    space: list[Distribution]
    trials: list[Trial]


def check_sweep(recipe: Recipe, spec: SweepSpec, where: str) -> CheckedSweep:
    """The sweep's settings against the recipe and every sampled trial against the recipe schema
    and its plugins, before anything starts (Ray included)."""
    train = recipe.train
    if train.eval_every <= 0:
        raise SweepError(f"{where}: train.eval_every: a sweep compares trials on their evaluations; set it "
                         f"(e.g. --set train.eval_every={max(train.steps // 4, 1)})")
    spec = with_defaults(spec, recipe.name, train.eval_every)
    assert spec.grace_period is not None
    if spec.scheduler == "asha" and spec.grace_period > train.steps:
        raise SweepError(f"grace_period: {spec.grace_period} steps is more than the {train.steps} a trial trains "
                         "(train.steps)")
    if recipe.run_url is not None:
        raise SweepError(f"{where}: output_dir: {recipe.output_dir} is an object store; a sweep keeps Ray Tune's "
                         "experiment state beside its trials, so it needs a local or shared directory")
    recipe = recipe.replace(output_dir=str(Path(recipe.output_dir).resolve()))
    data = recipe.to_dict()
    space = parse_space(spec.search, "--search")
    trials = sample_trials(space, spec.trials, recipe.seed)
    check_space(data, space, trials, where)
    return CheckedSweep(recipe, data, spec, space, trials)


def prepare(checked: CheckedSweep, where: str, nodes: list[dict[str, float]] | None, use_gpu: bool) -> SweepPlan:
    """The checked sweep with each trial's resources packed onto the cluster (`nodes`; None: this
    machine as a local Ray instance would see it)."""
    recipe, data, spec, space, trials = checked.recipe, checked.data, checked.spec, checked.space, checked.trials
    planned: dict[str, Any] = {}
    for trial in trials[:MAX_PLANNED]:
        trial_recipe = parse_recipe(with_values(data, trial.values), where=where, plugins=False)
        shape = json.dumps([asdict(trial_recipe.model), asdict(trial_recipe.head), trial_recipe.data.batch_size,
                            asdict(trial_recipe.engine), asdict(trial_recipe.scaling)], sort_keys=True, default=str)
        if shape not in planned:
            planned[shape] = trial_resources(trial_recipe, use_gpu)
    packing = pack(largest(list(planned.values())), nodes if nodes is not None else this_machine(), len(trials),
                   spec.max_concurrent)
    return SweepPlan(recipe, data, spec, space, trials, packing, use_gpu)


def check_same_trials(plan: SweepPlan) -> bool:
    """Whether the sweep directory already holds this sweep (True: restore it). A sweep started
    with other trials (search space, trials or seed changed) is refused rather than mixed."""
    record = plan.sweep_dir / TRIALS_FILE
    trials = [{"name": t.name, "values": t.values} for t in plan.trials]
    if not record.exists():
        return False
    try:
        before = json.loads(record.read_text())["trials"]
    except (OSError, ValueError, KeyError, TypeError):
        before = None
    if before != json.loads(json.dumps(trials)):
        raise SweepError(f"{plan.sweep_dir}: holds a sweep with other trials (the search space, trials or seed "
                         "changed); name this one differently (--name) or remove that directory")
    return True


def run_sweep(plan: SweepPlan, verbose: bool = False) -> dict[str, Any]:
    """Run (or restore) the sweep on the Ray instance this process is connected to; returns the
    summary written to sweep_result.json."""
    from ray import tune

    restoring = check_same_trials(plan) and tune.Tuner.can_restore(str(plan.sweep_dir / TUNE_DIR))
    plan.sweep_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(plan.sweep_dir / TRIALS_FILE, json.dumps(
        {"trials": [{"name": t.name, "values": t.values} for t in plan.trials]}, indent=1))
    parent = _parent_run(plan)
    context = TrialContext(plan.data, str(plan.sweep_dir), plan.tracking_uri(), parent.run_id if parent else None,
                           dict(plan.packing.resources.per_worker), plan.use_gpu, plan.spec.metric, verbose)
    # the trial's own actor only drives Ray Train; its workers reserve the resources (`packing`)
    trainable = tune.with_resources(tune.with_parameters(run_trial, context=context), driver_resources())
    if restoring:
        print(f"restoring sweep {plan.spec.name} from {plan.sweep_dir / TUNE_DIR}: finished trials are not run again")
        tuner = tune.Tuner.restore(str(plan.sweep_dir / TUNE_DIR), trainable=trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = _new_tuner(plan, trainable)
    grid = tuner.fit()
    outcomes = _outcomes(plan, grid)
    interrupted = any(o.status == "not run" for o in outcomes)
    summary = write_result(plan.sweep_dir, plan.spec, plan.space, outcomes)
    picture = draw(plan.sweep_dir / "sweep.png", plan.spec, plan.space, outcomes)
    if parent is not None:
        parent.close_trials(outcomes)
        if interrupted:
            parent.client.set_terminated(parent.run_id, status="KILLED")
        else:
            parent.finish(summary, plan.sweep_dir, picture, failed=best_outcome(outcomes, plan.spec) is None)
    summary["interrupted"] = interrupted
    return summary


def _parent_run(plan: SweepPlan) -> ParentRun | None:
    uri = plan.tracking_uri()
    if uri is None:
        return None
    from beitdist.tracking import resolve_uri

    _, artifacts = resolve_uri(replace(plan.recipe.tracking, uri=uri), plan.sweep_dir)
    parent = ParentRun(uri, artifacts, plan.recipe.tracking.experiment, plan.sweep_dir)
    resources = plan.packing.resources
    parent.log_settings(plan.spec, plan.space, plan.trials, plan.packing.concurrent, resources.describe())
    return parent


def _new_tuner(plan: SweepPlan, trainable: Any) -> Any:
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    spec = plan.spec
    scheduler: Any = FIFOScheduler()
    if spec.scheduler == "asha":
        # the last evaluation is at train.steps: the trial must go on to write final/, not be stopped there
        scheduler = ASHAScheduler(time_attr="step", max_t=plan.recipe.train.steps, grace_period=spec.grace_period or 1,
                                  reduction_factor=spec.reduction_factor, stop_last_trials=False)
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([{"index": t.index, "values": t.values} for t in plan.trials])},
        tune_config=tune.TuneConfig(metric=spec.metric, mode=spec.resolved_mode, scheduler=scheduler,
                                    max_concurrent_trials=plan.packing.concurrent,
                                    trial_name_creator=_trial_name, trial_dirname_creator=_trial_name),
        run_config=tune.RunConfig(name=TUNE_DIR, storage_path=str(plan.sweep_dir),
                                  failure_config=tune.FailureConfig(max_failures=0), verbose=0,
                                  callbacks=[trial_lines(spec.metric, plan.recipe.train.steps)]))


def trial_lines(metric: str, steps: int) -> Any:
    """One line per trial as it starts and ends (Tune's own tables are turned off: `-v` shows the
    workers' logs)."""
    from ray.tune import Callback

    class TrialLines(Callback):
        def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            print(f"{_trial_name(trial)} started ({_values(trial)})", flush=True)

        def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            result = trial.last_result or {}
            step = int(result.get("step", 0) or 0)
            value = result.get(metric)
            what = "finished" if step >= steps else f"stopped early at step {step}"
            print(f"{_trial_name(trial)} {what}" + (f": {metric} {value:.4f}" if value is not None else ""), flush=True)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
            print(f"{_trial_name(trial)} failed (see {trial.storage.trial_fs_path if trial.storage else 'its logs'})",
                  flush=True)

    return TrialLines()


def _values(trial: Any) -> str:
    return Trial(0, dict(trial.config["trial"]["values"])).describe()


def _trial_name(trial: Any) -> str:
    return Trial(int(trial.config["trial"]["index"]), {}).name


def run_trial(config: dict[str, Any], context: TrialContext) -> None:
    """One trial, in its Tune actor: the trial's recipe under Ray Train, its evaluations reported
    to Tune (the scheduler's input)."""
    import ray.tune

    from beitdist.launcher import fit_on_ray

    trial = Trial(int(config["trial"]["index"]), dict(config["trial"]["values"]))
    recipe = parse_recipe(context.trial_data(trial), where=f"sweep trial {trial.name}")
    done = _finished(recipe)
    if done is not None:  # finished before the sweep was interrupted: report it, do not train again
        ray.tune.report({"step": done["step"], **done["metrics"]})
        return
    fit_on_ray(recipe, context.use_gpu, context.verbose, callbacks=[metric_to_tune(context.metric)], progress=False)


def metric_to_tune(metric: str) -> Any:
    """Ray Train's reports of rank 0 forwarded to Tune when they hold `metric` (the evaluations),
    so the scheduler sees every evaluation and nothing else."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EvaluationsToTune(TuneReportCallback):
        warned = False

        def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
            if not metrics:
                return
            if metric in metrics[0]:
                super().after_report(run_context, metrics, None)
            elif not self.warned and any(k.startswith("val_") for k in metrics[0]):
                self.warned = True
                log.error("the sweep's metric %s is not among the evaluation's metrics (%s)", metric,
                          ", ".join(sorted(k for k in metrics[0] if k.startswith("val_"))))

    return EvaluationsToTune()


def _finished(recipe: Recipe) -> dict[str, Any] | None:
    result_file = RunDir(recipe.run_dir).result_file
    try:
        result = json.loads(result_file.read_text())
    except (OSError, ValueError):
        return None
    if int(result.get("step", 0)) < recipe.train.steps or not result.get("final_dir"):
        return None
    return {"step": int(result["step"]), "metrics": {k: float(v) for k, v in (result.get("metrics") or {}).items()}}


def _outcomes(plan: SweepPlan, grid: Any) -> list[TrialOutcome]:
    reported: dict[int, tuple[dict[str, Any], str | None]] = {}
    for result in grid:
        config = result.config or {}
        if "trial" not in config:
            continue
        error = result.error
        reason = None
        if error is not None:
            lines = [line for line in str(error).splitlines() if line.strip()]
            reason = f"{type(error).__name__}: {lines[-1] if lines else ''}"
        reported[int(config["trial"]["index"])] = (dict(result.metrics or {}), reason)
    outcomes = []
    for trial in plan.trials:
        run_dir = plan.sweep_dir / trial.name
        metrics, error = reported.get(trial.index, ({}, None))
        step = int(metrics.get("step", 0) or 0)
        value = metrics.get(plan.spec.metric)
        recipe = parse_recipe(with_values(plan.data, trial.values) | {"output_dir": str(plan.sweep_dir),
                                                                       "name": trial.name}, plugins=False)
        done = _finished(recipe)
        final_dir = None
        if done is not None:
            status, step = "finished", done["step"]
            value = done["metrics"].get(plan.spec.metric, value)
            final_dir = str(RunDir(run_dir).final)
        elif error is not None:
            status = "failed"
        elif metrics:
            status = "stopped early"
        else:
            status = "not run"
        outcomes.append(TrialOutcome(trial.index, trial.name, trial.values, status, step,
                                     float(value) if value is not None else math.nan, str(run_dir), final_dir, error))
    return outcomes


def local_cluster(num_cpus: int | None, verbose: bool) -> list[dict[str, float]]:
    """Start (or join) the local Ray instance a sweep without `--address` runs on; its nodes."""
    from beitdist.launcher import init_ray, worker_env

    init_ray(None, num_cpus or os.cpu_count() or 1, worker_env(1, verbose), verbose)
    return cluster_nodes()


def describe_outcomes(summary: dict[str, Any]) -> str:
    metric = summary["metric"]
    lines = []
    for trial in summary["trials"]:
        value = f"{metric} {trial['metric']:.4f}" if trial["metric"] is not None else f"no {metric}"
        values = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in trial["values"].items())
        lines.append(f"{trial['name']}  {trial['status']:13}  step {trial['step']:>6}  {value:24}  {values}"
                     + (f"  ({trial['error']})" if trial.get("error") else ""))
    best = summary.get("best")
    if best:
        lines.append(f"best: {best['name']} ({metric} {best['metric']:.4f}) -> {best['final_dir']}")
    return "\n".join(lines)
