"""MLflow tracking, a built-in callback plugin: rank 0 logs one MLflow run per beitdist run.

Why it looks the way it does:
- Only rank 0 talks to MLflow (one writer, no duplicate metrics); other ranks return at once and
  never import mlflow (it takes seconds to import).
- One MLflow run per run directory, across restarts: its id is kept in `<run_dir>/mlflow_run_id`
  and a restarted run continues it. A resumed run replays the steps between its checkpoint and
  the crash, and replayed steps are not logged again: a value is skipped when the store already
  holds that metric at that step or a later one (MLflow's latest value per metric, read just
  before the first values go, after a dying predecessor's last writes).
  That record is written in the same transaction as the values themselves; a mark kept as a run
  tag was not (MLflow commits a batch's tags apart from its metrics), and a worker killed between
  the two commits left steps that the restart logged twice.
- Tracking must never stop training: the first failing MLflow call is reported once (a warning
  naming the URI) and tracking is off for the rest of the run. HTTP timeouts are short.
- Where: `recipe.tracking.uri`, else `sqlite:///<run_dir>/mlflow.db` with artifacts in
  `<run_dir>/mlartifacts` (never ./mlruns of the working directory). MLFLOW_TRACKING_URI is
  turned into `tracking.uri` by the launcher, not read here.
- Only `MlflowClient` is used, never the fluent `mlflow.start_run`: no process-global active run
  that a user's own MLflow code (or a second run in the same process) could collide with.
- Every MLflow call runs on one background thread, in order (`beitdist.background`): creating a
  sqlite store takes seconds and a server round trip tens of milliseconds, and the other ranks
  would wait for rank 0 at the next collective. The hooks only queue work. A checkpoint about to
  be written (`beitdist_on_checkpoint_start`) and the end of training wait until everything
  before them is in the store, so a run restarted from a checkpoint never misses a step that came
  before it. A run that fails with an exception (`beitdist_on_train_failed`) gets
  `EXIT_DRAIN_S` seconds to write what is queued, then its MLflow run is marked FAILED. A process
  that exits without ending its run gets the same time at exit. A process killed outright
  (SIGKILL, `ray.kill`) loses what it queued since its last checkpoint; its restart replays that.
- Per-step metrics are batched: every step is logged, with its own step number and time, but they
  go to MLflow in one `log_batch` at most every `SEND_EVERY_S` seconds, and before anything else
  is logged (an evaluation, a checkpoint, a failure, the end). One sqlite transaction per step
  cost rank 0 a core-share that the other ranks then waited for at the next all-reduce: 6-13% of
  the quickstart's images/s (benchmarks/launch_overhead.py, `--set tracking.enabled=false`).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from glob import escape as glob_escape
from pathlib import Path
from typing import Any

from beitdist.background import OrderedWorker
from beitdist.credentials import redact_url, redacted
from beitdist.hookspecs import hookimpl
from beitdist.run.files import write_atomic
from beitdist.run.rundir import RunDir

log = logging.getLogger(__name__)

HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1"}
"""Set (unless already set) before the first call, so an unreachable server costs seconds, not
MLflow's default minutes of retries with backoff."""
MAX_KEY, MAX_PARAM_VALUE, PARAMS_PER_BATCH = 250, 6000, 100  # MLflow's limits
MAX_BATCH = 1000  # MLflow's limit on metrics + tags in one log_batch
STALE_SCRATCH_S = 3600.0  # a scratch sqlite store this old was left by a killed run (see create_sqlite_store)
PICTURES = 4
EXIT_DRAIN_S = 30.0
SEND_EVERY_S = 5.0
"""Per-step metrics are sent together at most this often, and kept steps no longer than this (plus
half of it) when nothing follows them. A live MLflow UI lags by up to this much; steps slower than
this go one by one."""

Entry = tuple[int, int, Mapping[str, Any]]
"""(step, milliseconds since the epoch when it was logged, metrics) of one event."""


def setting(section: Any, name: str, default: Any) -> Any:
    """`<section>.<name>` of a recipe section (TrackingSection, HeadSection), `default` without one
    (a callback context that carries no recipe)."""
    return default if section is None else getattr(section, name, default)


def resolve_uri(tracking: Any, run_dir: Path) -> tuple[str, str | None]:
    """(tracking URI, artifact location for a new experiment). A local sqlite store keeps its
    artifacts beside the database file; a server (or another database) decides for itself."""
    uri = setting(tracking, "uri", None)
    if not uri:
        uri = f"sqlite:///{RunDir(Path(run_dir).resolve()).mlflow_db}"
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return uri, (Path(uri.removeprefix("sqlite:///")).resolve().parent / RunDir.MLFLOW_ARTIFACTS).as_uri()
    return uri, None


def create_sqlite_store(uri: str) -> None:
    """Create a missing sqlite store whole or not at all: MLflow builds its tables and migrations
    in place for seconds, and a run stopped meanwhile (Ctrl-C, a killed worker) would leave a
    half-built database that every later open fails on. Build it in a temporary file beside it,
    then link it into place (atomic); a store that appeared meanwhile wins. A process killed
    during the build (SIGKILL, a lost node) leaves its scratch file: those older than
    `STALE_SCRATCH_S` are removed here (a build takes seconds, so none of them is still in use)."""
    if not uri.startswith("sqlite:///") or uri == "sqlite:///:memory:" or "?" in uri:
        return  # not a plain local file (a query string carries driver options): MLflow makes it
    path = Path(uri.removeprefix("sqlite:///"))
    _remove_stale_scratch(path)
    if path.exists():
        return
    from mlflow import MlflowClient

    path.parent.mkdir(parents=True, exist_ok=True)
    scratch = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")  # MLflow caches stores by URI: never reuse one
    try:
        client = MlflowClient(tracking_uri=f"sqlite:///{scratch}")
        client.search_experiments()  # opening the store creates and migrates it
        _dispose_sqlalchemy_engines(client)
        try:
            os.link(scratch, path)  # atomic, and never over a store another run made meanwhile
        except FileExistsError:
            pass
    finally:
        scratch.unlink(missing_ok=True)


def _remove_stale_scratch(path: Path) -> None:
    if not path.parent.is_dir():
        return
    now = time.time()
    for scratch in path.parent.glob(f".{glob_escape(path.name)}.*.tmp"):
        try:
            if now - scratch.stat().st_mtime > STALE_SCRATCH_S:
                scratch.unlink()
                log.info("removed %s, left by a run stopped while it built the MLflow store", scratch)
        except OSError:  # another run removed it first, or it is not ours to remove
            pass


def _dispose_sqlalchemy_engines(client: Any) -> None:
    """Close the scratch store's connections before it is renamed (MLflow caches its engine)."""
    store = getattr(getattr(client, "_tracking_client", None), "store", None)
    engine = getattr(store, "engine", None)
    if engine is not None:
        engine.dispose()


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested recipe dict -> {"optim.lr": "0.001", ...}: dotted keys, values as strings within
    MLflow's limits; lists stay whole ("[0.9, 0.999]"); an empty mapping is kept as "{}"."""
    flat: dict[str, str] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            text = json.dumps(value, default=str) if isinstance(value, (list, tuple, Mapping)) else str(value)
            flat[name[:MAX_KEY]] = text[:MAX_PARAM_VALUE]
    return flat


def _plain(recipe: Any) -> dict[str, Any]:
    """The recipe as plain JSON-able data (a Recipe, a mapping, or nothing), credentials redacted:
    MLflow's params and artifacts are read by everyone who can read the server."""
    data = recipe.to_dict() if hasattr(recipe, "to_dict") else dict(recipe or {})
    return json.loads(json.dumps(redacted(data), default=str))


class Tracker:
    """The MLflow run of one beitdist run, on rank 0 of one process."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self.tracking = getattr(context.recipe, "tracking", None)
        self.uri, self.artifact_location = resolve_uri(self.tracking, context.run_dir)
        self.enabled = True
        self.client: Any = None
        self.run_id: str | None = None
        self.latest: dict[str, int] | None = None
        """The last step the store holds for each metric key (see `_log_metrics_now`): read just
        before the first values are sent, the latest moment a dying predecessor may have written."""
        resumed = int(context.extras.get("resumed_step") or 0)
        self.floor = resumed if resumed > 0 else -1
        """Nothing at or before the step training resumed from is logged again."""
        self.worker = OrderedWorker("beitdist-mlflow")
        self.steps: list[Entry] = []
        """Per-step metrics not yet queued (see `log_step`)."""
        self.steps_values, self.sent_at, self.closed = 0, -math.inf, False  # the first step goes at once
        self.steps_lock = threading.Lock()
        """Held while steps are kept or anything is queued: the training thread logs, a failure,
        the exit handler or the timer may send, and close."""
        self.closing = threading.Event()
        threading.Thread(target=self._send_late_steps, name="beitdist-mlflow-timer", daemon=True).start()

    def submit(self, action: Callable[[], None]) -> None:
        """Queue `action` for the MLflow thread, guarded (see `guarded`), after the kept steps (the
        run is never marked FAILED or FINISHED before its last steps are in); nothing after `close`."""
        with self.steps_lock:
            self._queue_steps()
            if not self.closed:
                self.worker.submit(lambda: self.guarded(action))

    def guarded(self, action: Callable[[], None]) -> None:
        """Run `action` unless tracking is off; the first failure turns tracking off for good."""
        if not self.enabled:
            return
        try:
            action()
        except Exception as err:  # any MLflow, network or filesystem error: training goes on
            self.enabled = False
            log.warning("MLflow tracking to %s failed, tracking is off for the rest of run %r: %s: %s",
                        redact_url(self.uri), self.context.run_name, type(err).__name__, err)

    # ----------------------------------------------------------------- start
    def start(self) -> None:
        from mlflow import MlflowClient

        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        run_dir = Path(self.context.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        create_sqlite_store(self.uri)
        self.client = MlflowClient(tracking_uri=self.uri)
        experiment_id = self._experiment_id()
        run = self._existing_run(RunDir(run_dir).mlflow_run_id_file)
        if run is None:
            tags = {"beitdist.run_dir": str(run_dir.resolve())}
            parent = setting(self.tracking, "parent_run_id", None)
            if parent:
                tags["mlflow.parentRunId"] = parent  # a sweep's trial: shown nested under the sweep's run
            run = self.client.create_run(experiment_id, run_name=self.context.run_name, tags=tags)
            write_atomic(RunDir(run_dir).mlflow_run_id_file, run.info.run_id)
        else:
            self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id = run.info.run_id
        self._log_params(run.data.params)
        recipe = _plain(self.context.recipe)
        if recipe:
            import yaml

            self.client.log_text(self.run_id, yaml.safe_dump(recipe, sort_keys=False), "recipe.yaml")

    def _experiment_id(self) -> str:
        name = setting(self.tracking, "experiment", "beitdist")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        try:
            return self.client.create_experiment(name, artifact_location=self.artifact_location)
        except Exception:  # created meanwhile by another run on the same server
            experiment = self.client.get_experiment_by_name(name)
            if experiment is None:
                raise
            return experiment.experiment_id

    def _existing_run(self, id_file: Path) -> Any:
        """The run a previous attempt started, or None (no id file, or a run this store lacks:
        the URI changed or the run was deleted). Any other error is a failure like any other."""
        from mlflow.exceptions import MlflowException

        if not id_file.exists():
            return None
        run_id, run = id_file.read_text().strip(), None
        try:
            run = self.client.get_run(run_id)
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
        if run is None or run.info.lifecycle_stage != "active":
            log.warning("MLflow run %s (from %s) is not in %s; starting a new run", run_id, id_file, redact_url(self.uri))
            return None
        return run

    def _log_params(self, existing: Mapping[str, str]) -> None:
        """Params are write-once in MLflow: log the missing ones only, say which ones changed."""
        flat = flatten(_plain(self.context.recipe))
        gflops = getattr(self.context, "extras", {}).get("gflops_per_image")
        if gflops:  # the model's forward cost, for reading tflops_per_rank / mfu
            flat["model.gflops_per_image"] = f"{gflops:.4g}"
        changed = sorted(k for k, v in flat.items() if k in existing and existing[k] != v)
        if changed:
            log.warning("recipe values changed since MLflow run %s started (params stay as first logged): %s",
                        self.run_id, ", ".join(changed))
        from mlflow.entities import Param

        missing = [Param(k, v) for k, v in flat.items() if k not in existing]
        for i in range(0, len(missing), PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=missing[i:i + PARAMS_PER_BATCH])

    # ------------------------------------------------------------ events
    def log_step(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Keep one training step's metrics (a copy). The kept steps are queued as one `log_batch`
        once `SEND_EVERY_S` has passed since the last batch (a step that comes later than that goes
        at once), before a step that would take the batch past what one `log_batch` may hold (so
        a batch ends at a step), and before any other event."""
        entry = (step, int(time.time() * 1000), dict(metrics))
        with self.steps_lock:
            if self.steps and self.steps_values + len(entry[2]) > MAX_BATCH:
                self._queue_steps()
            self.steps.append(entry)
            self.steps_values += len(entry[2])
            if time.monotonic() - self.sent_at >= SEND_EVERY_S:
                self._queue_steps()

    def _send_late_steps(self) -> None:
        """Kept steps go after `SEND_EVERY_S` even when no step or event follows: the steps before
        a hang (a stuck collective, a stalled loader) are the ones worth seeing."""
        while not self.closing.wait(min(max(SEND_EVERY_S / 2, 0.05), 30.0)):
            with self.steps_lock:
                if self.steps and time.monotonic() - self.sent_at >= SEND_EVERY_S:
                    self._queue_steps()

    def send_steps(self) -> None:
        """Queue the kept training steps now."""
        with self.steps_lock:
            self._queue_steps()

    def _queue_steps(self) -> None:
        """With `steps_lock` held: whichever thread sends (training, the timer, a failure, the exit
        handler), batches reach the queue in step order, and nothing is queued after `close`."""
        if not self.steps:
            return
        entries, self.steps, self.steps_values, self.sent_at = self.steps, [], 0, time.monotonic()
        if not self.closed:
            self.worker.submit(lambda: self._log_metrics_now(entries, {}))

    def log_metrics(self, step: int, metrics: Mapping[str, Any], tags: Mapping[str, str] | None = None) -> None:
        """Queue one `log_batch` for this event (a copy of `metrics`: the caller may reuse it),
        after the training steps kept so far: MLflow sees the events in the order they happened."""
        entries: list[tuple[int, int, Mapping[str, Any]]] = [(step, int(time.time() * 1000), dict(metrics))]
        tags = dict(tags or {})
        with self.steps_lock:
            self._queue_steps()
            if not self.closed:
                self.worker.submit(lambda: self._log_metrics_now(entries, tags))

    def drain(self, timeout: float | None = None) -> bool:
        """Queue the kept steps and wait until everything queued is in the store."""
        self.send_steps()
        return self.worker.drain(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Queue the kept steps, write everything queued and stop the MLflow thread; later events
        are dropped (a training thread still running while the process exits must not fail)."""
        with self.steps_lock:
            self._queue_steps()
            self.closed = True
        self.closing.set()
        return self.worker.close(timeout)

    def _log_metrics_now(self, entries: list[Entry], tags: Mapping[str, str]) -> None:
        """A value of a metric at a step the store already holds for it (or before it) is skipped:
        a resumed run replays the steps after its checkpoint, and a restarted group may replay
        steps its failed predecessor wrote just before it died. Nothing at or before the step
        training resumed from is logged either. Non-finite or non-numeric values are left out."""
        if not self.enabled:
            return
        from mlflow.entities import Metric, RunTag

        if self.latest is None:
            self.guarded(self._read_latest)
            if self.latest is None:  # tracking just turned off
                return
        values = []
        for step, when, metrics in entries:
            if step <= self.floor:
                continue
            for name, value in metrics.items():
                key = re.sub(r"[^\w\-. /]", "_", name)[:MAX_KEY]
                if (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                        and step > self.latest.get(key, -1)):
                    values.append(Metric(key, float(value), when, step))
        if not values:
            return
        all_tags = [RunTag(k, v) for k, v in tags.items()]
        split = max(len(values) - (MAX_BATCH - len(all_tags)), 0)  # what does not fit beside the tags
        for start in range(0, split, MAX_BATCH):
            self.guarded(lambda: self.client.log_batch(self.run_id, metrics=values[start:min(start + MAX_BATCH, split)]))
        self.guarded(lambda: self.client.log_batch(self.run_id, metrics=values[split:], tags=all_tags))
        for metric in values:
            self.latest[metric.key] = max(self.latest.get(metric.key, -1), metric.step)

    def _read_latest(self) -> None:
        run = self.client.get_run(self.run_id)
        self.latest = {metric.key: metric.step for metric in run.data.to_proto().metrics}

    def finish(self, step: int, metrics: Mapping[str, Any], final_dir: str | Path | None) -> None:
        """Queue the end of the run and wait for everything queued: the run is complete (or
        tracking failed and said so) when training returns."""
        self.log_metrics(step, metrics)  # already logged by the last evaluation: skipped
        self.submit(lambda: self._finish_now(final_dir))
        self.close()

    def _finish_now(self, final_dir: str | Path | None) -> None:
        if final_dir is not None and Path(final_dir).is_dir():
            self.guarded(lambda: self.client.log_artifacts(self.run_id, str(final_dir), RunDir.FINAL))
        if self.enabled and setting(self.tracking, "log_images", True):
            self._log_pictures(final_dir)
        self.guarded(lambda: self.client.set_terminated(self.run_id, "FINISHED"))

    def _log_pictures(self, final_dir: str | Path | None) -> None:
        """Drawing is not MLflow: a failure there is reported but does not turn tracking off."""
        try:
            images = pictures(self.context, final_dir)
        except Exception as err:
            log.warning("could not draw pictures for MLflow run %s: %s: %s", self.run_id, type(err).__name__, err)
            return
        if images:
            with tempfile.TemporaryDirectory() as tmp:
                for name, image in images.items():
                    image.save(Path(tmp) / name)
                self.guarded(lambda: self.client.log_artifacts(self.run_id, tmp, "pictures"))


# ------------------------------------------------------------------ pictures
def pictures(context: Any, final_dir: str | Path | None = None) -> dict[str, Any]:
    """PNG-ready PIL images of the first `PICTURES` examples of `context.extras["sample_batch"]`
    (a dict of CPU tensors), drawn by the run's head (`Head.pictures`: the inputs, masked patches,
    predictions, ... as the head decides). Empty without a sample batch."""
    batch = context.extras.get("sample_batch")
    if not batch or "pixel_values" not in batch:
        return {}
    batch = {k: v[:PICTURES] for k, v in batch.items()}
    return _head_class(context).pictures(batch, lambda: _picture_model(context, final_dir))


def _head_class(context: Any) -> Any:
    """The class of the run's head: the live model's, else the recipe's by name (the base `Head`,
    which draws the inputs, for a bare backbone)."""
    from beitdist.heads.base import Head

    head = getattr(context.model, "head", None)
    if isinstance(head, Head):
        return type(head)
    name = setting(getattr(context.recipe, "head", None), "name", None)
    from beitdist.plugins import UnknownPluginError, head_class

    try:
        return head_class(name) if name is not None else Head
    except UnknownPluginError:
        return Head


def _sharded(param: Any) -> bool:
    """A parameter ZeRO-3 partitioned (`ds_id`) or fairscale's FSDP sharded over several ranks."""
    return hasattr(param, "ds_id") or bool(getattr(param, "_is_sharded", False))


def _picture_model(context: Any, final_dir: str | Path | None) -> Any:
    """The trained model for predictions: the live one, unless ZeRO-3 or fairscale's FSDP sharded
    its parameters (a forward on rank 0 alone would fail, or wait forever for the other ranks) —
    then the consolidated final weights."""
    model = context.model
    if model is not None and not any(_sharded(p) for p in model.parameters()):
        return model
    if final_dir is not None and Path(final_dir).is_dir():
        from beitdist.checkpoint import load_model

        return load_model(final_dir, head="auto")
    return None


# -------------------------------------------------------------------- hooks
_active: Tracker | None = None


def reset() -> None:
    """Forget the tracker of this process (what a restarted process starts with), after its
    queued calls have run; for tests."""
    global _active
    if _active is not None:
        _active.close()
    _active = None


def flush() -> None:
    """Wait until this process's queued MLflow calls have run (tools and tests that read the store)."""
    if _active is not None:
        _active.drain()


@atexit.register
def _drain_at_exit() -> None:
    """A process that exits without ending its run still gets its queued metrics written, within limits."""
    if _active is not None:
        _close_within_limit(_active, "at exit")


def _close_within_limit(tracker: Tracker, when: str) -> None:
    """Write what is queued, waiting at most `EXIT_DRAIN_S`: the process is on its way out."""
    if not tracker.close(EXIT_DRAIN_S):
        log.warning("MLflow calls still queued %.0f s %s; the last ones are lost", EXIT_DRAIN_S, when)


def _tracker(context: Any) -> Tracker | None:
    if _active is None or context.rank != 0 or Path(_active.context.run_dir) != Path(context.run_dir):
        return None
    return _active


@hookimpl
def beitdist_on_train_start(context: Any) -> None:
    """Rank 0: open (or continue) the MLflow run, log params and the recipe."""
    reset()
    if context.rank != 0 or context.recipe is None:  # no recipe: not a beitdist run, nothing to log
        return
    if not setting(getattr(context.recipe, "tracking", None), "enabled", True):
        return
    global _active
    _active = Tracker(context)
    _active.submit(_active.start)


@hookimpl
def beitdist_on_step_end(context: Any, step: int, metrics: dict[str, Any]) -> None:
    if (tracker := _tracker(context)) is not None:
        tracker.log_step(step, metrics)


@hookimpl
def beitdist_on_eval_end(context: Any, step: int, metrics: dict[str, float]) -> None:
    if (tracker := _tracker(context)) is not None:
        tracker.log_metrics(step, metrics)


@hookimpl
def beitdist_on_checkpoint_saved(context: Any, step: int, path: str) -> None:
    if (tracker := _tracker(context)) is not None:
        tracker.log_metrics(step, {"last_checkpoint_step": step},
                            {"beitdist.last_checkpoint_step": str(step), "beitdist.last_checkpoint": str(path)})
        tracker.drain()  # one write; a run stopped here (train.stop_at) keeps the record


@hookimpl
def beitdist_on_checkpoint_start(context: Any, step: int) -> None:
    """A run resumed from this checkpoint replays only the steps after it: every step before it
    must be in the store before the checkpoint exists."""
    if (tracker := _tracker(context)) is not None:
        tracker.drain()


@hookimpl
def beitdist_on_train_failed(context: Any, step: int, error: BaseException) -> None:
    """Rank 0: what is queued is written (within `EXIT_DRAIN_S`), then the run is FAILED (a
    restart sets it RUNNING again)."""
    global _active
    if (tracker := _tracker(context)) is not None:
        tracker.submit(lambda: tracker.client.set_terminated(tracker.run_id, "FAILED"))
        _close_within_limit(tracker, "after the failure")
        _active = None


@hookimpl
def beitdist_on_train_end(context: Any, step: int, metrics: dict[str, float], final_dir: str | Path | None) -> None:
    """Rank 0: final weights and pictures as artifacts, then the run is FINISHED."""
    global _active
    if (tracker := _tracker(context)) is not None:
        tracker.finish(step, metrics, final_dir)
        _active = None
