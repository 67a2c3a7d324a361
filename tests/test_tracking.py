"""MLflow tracking (beitdist.tracking): one run per run directory across restarts, rank 0 only,
never stops training. The hooks are called the way train.py calls them (through
`beitdist.plugins.emit`), with a TrainContext and a tiny fake recipe; results are read back with
MlflowClient from the sqlite store the plugin made in the run directory."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from beitdist import plugins, tracking
from beitdist.events import TrainContext
from beitdist.recipe import Recipe, TrackingSection, parse_recipe


def FakeTracking(**settings) -> TrackingSection:  # noqa: N802 - reads as the section it builds
    return TrackingSection(**settings)


def FakeRecipe(tracking: TrackingSection | None = None, head: str = "mim", steps: int = 8) -> Recipe:  # noqa: N802
    """A real Recipe (parsed without asking the plugin registry: tracking only reads it)."""
    section = dataclasses.asdict(tracking or TrackingSection())
    return parse_recipe({"name": "t", "head": {"name": head}, "optim": {"lr": 0.001},
                         "train": {"steps": steps}, "tracking": section}, plugins=False)


@pytest.fixture(autouse=True)
def clean_state(monkeypatch):
    """No tracker left from another test; the HTTP settings the plugin sets are undone after."""
    for name in tracking.HTTP_DEFAULTS:
        monkeypatch.setenv(name, "x")
        monkeypatch.delenv(name)
    tracking.reset()
    yield
    tracking.reset()


@pytest.fixture(scope="module")
def emit():
    """plugins.emit, with the tracking plugin registered as the built-in it is."""
    assert "beitdist.tracking" in plugins.BUILTIN_PLUGINS
    return plugins.emit


@pytest.fixture(scope="module")
def empty_store(tmp_path_factory):
    """A migrated, empty sqlite store: creating one takes ~5 s on a busy 2-core machine, so the
    tests that do not check the plugin creating its own copy one into the run dir."""
    from mlflow import MlflowClient

    path = tmp_path_factory.mktemp("store") / "mlflow.db"
    MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


def _with_store(run_dir, empty_store):
    run_dir.mkdir(parents=True)
    shutil.copy(empty_store, run_dir / "mlflow.db")
    return run_dir


def _context(run_dir, rank=0, resumed=0, **recipe):
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, :5] = True
    batch = {"pixel_values": torch.randn(2, 3, 32, 32), "bool_masked_pos": mask}
    return TrainContext("t", run_dir, rank, 2, FakeRecipe(**recipe), None,
                        extras={"resumed_step": resumed, "sample_batch": batch})


def _steps(emit, ctx, steps):
    for s in steps:
        emit("beitdist_on_step_end", context=ctx, step=s,
             metrics={"loss": 1.0 / s, "lr": 1e-3, "grad_norm": math.nan if s == 2 else 0.5, "images_per_s": 10.0})


def _client(run_dir):
    from mlflow import MlflowClient

    return MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")


def _runs(client):
    experiment = client.get_experiment_by_name("beitdist")
    return client.search_runs([experiment.experiment_id])


def _history(client, run_id, key):
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------ helpers
def test_flatten_dotted_keys_stringified_within_mlflow_limits():
    flat = tracking.flatten({**FakeRecipe().to_dict(), "notes": "x" * 7000})
    assert flat["optim.lr"] == "0.001" and flat["optim.betas"] == "[0.9, 0.999]"
    assert flat["head.options"] == "{}" and flat["tracking.uri"] == "None"
    assert len(flat["notes"]) == 6000


def test_settings_from_a_mapping_or_an_object(tmp_path):
    assert tracking.setting(FakeTracking(uri="http://x"), "uri", None) == "http://x"
    assert tracking.setting(None, "enabled", True) is True
    uri, artifacts = tracking.resolve_uri({"uri": None}, tmp_path / "run")
    assert uri == f"sqlite:///{tmp_path / 'run' / 'mlflow.db'}"
    assert artifacts == (tmp_path / "run" / "mlartifacts").as_uri()
    assert tracking.resolve_uri(FakeTracking(uri="http://h:5000"), tmp_path) == ("http://h:5000", None)


# ---------------------------------------------------------------- one run
def test_one_run_params_metrics_artifacts(emit, tmp_path, monkeypatch):
    """Params, metrics with exact steps, checkpoint tag, artifacts in the run dir (none in ./mlruns)."""
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    ctx = _context(run_dir)
    emit("beitdist_on_train_start", context=ctx)
    _steps(emit, ctx, range(1, 5))
    emit("beitdist_on_eval_end", context=ctx, step=4, metrics={"val_loss": 0.5, "val_accuracy": 0.25})
    emit("beitdist_on_checkpoint_start", context=ctx, step=4)
    emit("beitdist_on_checkpoint_saved", context=ctx, step=4, path=str(run_dir / "checkpoints" / "step_4"))
    final = run_dir / "final"
    final.mkdir(exist_ok=True, parents=True)
    (final / "model.safetensors").write_bytes(b"weights")
    emit("beitdist_on_train_end", context=ctx, step=4, metrics={"val_loss": 0.5}, final_dir=final)

    client = _client(run_dir)
    (run,) = _runs(client)
    run_id = run.info.run_id
    assert (run_dir / "mlflow_run_id").read_text() == run_id and run.info.status == "FINISHED"
    assert run.data.params["optim.lr"] == "0.001" and run.data.params["train.steps"] == "8"
    assert _history(client, run_id, "loss") == [1, 2, 3, 4]
    assert _history(client, run_id, "grad_norm") == [1, 3, 4]  # NaN left out
    assert _history(client, run_id, "val_accuracy") == [4]
    assert run.data.tags["beitdist.last_checkpoint_step"] == "4"
    top = {a.path for a in client.list_artifacts(run_id)}
    assert top == {"recipe.yaml", "final", "pictures"}
    pictures = {a.path for a in client.list_artifacts(run_id, "pictures")}
    assert {"pictures/input_0.png", "pictures/masked_1.png"} <= pictures
    assert run.info.artifact_uri.startswith((run_dir / "mlartifacts").as_uri())
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()
    from PIL import Image

    masked = next((run_dir / "mlartifacts").rglob("masked_0.png"))
    assert Image.open(masked).getpixel((0, 0)) == (128, 128, 128)  # patch 0 is masked


def _first_process(emit, run_dir, last_step: int) -> str:
    """A process that logs steps 1..`last_step` with a checkpoint at step 4, then dies (the
    tracker's module state is reset); the id of its MLflow run."""
    first = _context(run_dir)
    emit("beitdist_on_train_start", context=first)
    _steps(emit, first, range(1, last_step + 1))
    emit("beitdist_on_checkpoint_start", context=first, step=4)
    emit("beitdist_on_checkpoint_saved", context=first, step=4, path="ckpt4")
    tracking.reset()
    return (run_dir / "mlflow_run_id").read_text()


def test_restart_continues_the_same_run_without_duplicate_steps(emit, tmp_path, caplog, empty_store):
    """A restart (fresh module state, same run dir) continues the run: no second run, no step
    logged twice even though steps 5-6 are replayed from the step-4 checkpoint."""
    run_dir = _with_store(tmp_path / "run", empty_store)
    run_id = _first_process(emit, run_dir, last_step=6)  # then it died; a new one starts from step 4
    again = _context(run_dir, resumed=4, steps=10)  # and the recipe changed meanwhile
    with caplog.at_level(logging.WARNING, logger="beitdist.tracking"):
        emit("beitdist_on_train_start", context=again)
        tracking.flush()  # the MLflow calls run on the tracker's thread
    assert "train.steps" in caplog.text
    _steps(emit, again, range(5, 11))
    emit("beitdist_on_eval_end", context=again, step=10, metrics={"val_loss": 0.1})
    emit("beitdist_on_train_end", context=again, step=10, metrics={"val_loss": 0.1}, final_dir=None)

    client = _client(run_dir)
    (run,) = _runs(client)
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert _history(client, run_id, "loss") == list(range(1, 11))
    assert run.data.params["train.steps"] == "8"  # params are write-once
    assert (run_dir / "mlflow_run_id").read_text() == run_id


def test_steps_a_killed_predecessor_wrote_after_its_checkpoint_are_not_logged_twice(emit, tmp_path, empty_store):
    """A group restarted from the step-4 checkpoint replays steps 5-8, but its predecessor wrote
    5-6 as it died (a peer SIGKILLed, then Ray killed it), even after the new group's tracker
    started: the store's own record of each metric's last step, read before the first values go,
    decides, so 5-6 are not logged twice, whatever the predecessor managed to write beside them (a
    mark kept as a tag is committed apart from the values)."""
    run_dir = _with_store(tmp_path / "run", empty_store)
    run_id = _first_process(emit, run_dir, last_step=4)
    again = _context(run_dir, resumed=4)
    emit("beitdist_on_train_start", context=again)
    tracking.flush()
    from mlflow.entities import Metric

    now = int(time.time() * 1000)  # the dying worker's last batch: values only, nothing else
    _client(run_dir).log_batch(run_id, metrics=[Metric(k, 0.5, now, s) for s in (5, 6) for k in ("loss", "lr")])
    _steps(emit, again, range(5, 9))
    emit("beitdist_on_train_end", context=again, step=8, metrics={}, final_dir=None)
    client = _client(run_dir)
    for key in ("loss", "lr"):
        assert _history(client, run_id, key) == list(range(1, 9)), key
    assert _history(client, run_id, "images_per_s") == list(range(1, 9))  # the dead worker had not sent it for 5-6
    assert _history(client, run_id, "last_checkpoint_step") == [4]


def test_hooks_queue_mlflow_calls_and_checkpoints_wait_for_them(emit, tmp_path, monkeypatch, empty_store):
    """The training loop does not wait for MLflow: a store that is still opening costs the
    start and step hooks nothing; a checkpoint about to be written waits until every step before it is logged
    (a restart from it must not miss one); the end of training waits for the run to finish.

    No wall-clock bound: the store's opening is held until the hooks have returned, so hooks
    that waited for it would hold the test until `release` timed out, and `opened` would say so."""
    slow_start = tracking.Tracker.start
    release, opened = threading.Event(), threading.Event()

    def start(self):
        release.wait(60)
        slow_start(self)
        opened.set()

    monkeypatch.setattr(tracking.Tracker, "start", start)
    run_dir = _with_store(tmp_path / "run", empty_store)
    ctx = _context(run_dir)
    emit("beitdist_on_train_start", context=ctx)
    _steps(emit, ctx, range(1, 4))
    assert not opened.is_set(), "the hooks waited for the MLflow store to open"
    assert not (run_dir / "mlflow_run_id").exists()  # still opening the store
    release.set()
    emit("beitdist_on_checkpoint_start", context=ctx, step=3)
    client = _client(run_dir)
    (run,) = _runs(client)
    assert _history(client, run.info.run_id, "loss") == [1, 2, 3] and run.info.status == "RUNNING"
    emit("beitdist_on_checkpoint_saved", context=ctx, step=3, path="ckpt3")
    _steps(emit, ctx, [4])
    emit("beitdist_on_train_end", context=ctx, step=4, metrics={}, final_dir=None)
    (run,) = _runs(client)
    assert _history(client, run.info.run_id, "loss") == [1, 2, 3, 4] and run.info.status == "FINISHED"
    assert tracking._active is None


def test_a_failed_run_writes_its_queue_and_is_marked_failed(emit, tmp_path, empty_store):
    """A training loop that raises: what was queued is written, the run is FAILED; a restart
    (the same run dir) sets it RUNNING again and continues it."""
    run_dir = _with_store(tmp_path / "run", empty_store)
    ctx = _context(run_dir)
    emit("beitdist_on_train_start", context=ctx)
    _steps(emit, ctx, range(1, 4))
    emit("beitdist_on_train_failed", context=ctx, step=3, error=RuntimeError("CUDA out of memory"))
    assert tracking._active is None
    client = _client(run_dir)
    (run,) = _runs(client)
    assert run.info.status == "FAILED" and _history(client, run.info.run_id, "loss") == [1, 2, 3]
    emit("beitdist_on_train_start", context=_context(run_dir))
    tracking.flush()
    (again,) = _runs(client)
    assert again.info.run_id == run.info.run_id and again.info.status == "RUNNING"


def _record_calls(monkeypatch):
    """(name, metrics, tags) of every MlflowClient.log_batch / set_terminated call that MLflow
    accepted, in order (the calls still go through)."""
    from mlflow import MlflowClient

    calls, log_batch, set_terminated = [], MlflowClient.log_batch, MlflowClient.set_terminated

    def logging_batch(self, run_id, metrics=(), params=(), tags=(), **kwargs):
        result = log_batch(self, run_id, metrics=metrics, params=params, tags=tags, **kwargs)
        calls.append(("log_batch", [(m.key, m.step) for m in metrics], [t.key for t in tags]))
        return result

    def terminating(self, run_id, status=None, **kwargs):
        result = set_terminated(self, run_id, status, **kwargs)
        calls.append(("set_terminated", status, []))
        return result

    monkeypatch.setattr(MlflowClient, "log_batch", logging_batch)
    monkeypatch.setattr(MlflowClient, "set_terminated", terminating)
    return calls


def _started(emit, tmp_path, empty_store):
    run_dir = _with_store(tmp_path / "run", empty_store)
    ctx = _context(run_dir)
    emit("beitdist_on_train_start", context=ctx)
    tracking.flush()
    return run_dir, ctx, (run_dir / "mlflow_run_id").read_text()


def test_steps_are_sent_together_in_order_with_their_own_times(emit, tmp_path, monkeypatch, empty_store):
    """Per-step metrics are kept (for up to SEND_EVERY_S after the last batch) and go in one
    log_batch, before the event after them; each keeps its own step and time. With no wait,
    every step is its own call."""
    run_dir, ctx, run_id = _started(emit, tmp_path, empty_store)
    tracking.flush()
    calls = _record_calls(monkeypatch)
    monkeypatch.setattr(tracking, "SEND_EVERY_S", 3600.0)
    tracking._active.sent_at = time.monotonic()  # as if a batch had just been sent
    for step in range(1, 21):
        time.sleep(0.003)
        emit("beitdist_on_step_end", context=ctx, step=step, metrics={"loss": 1.0 / step})
    time.sleep(0.3)
    assert calls == []  # kept, not queued
    emit("beitdist_on_eval_end", context=ctx, step=20, metrics={"val_loss": 0.5})
    tracking.flush()
    assert [name for name, _, _ in calls] == ["log_batch", "log_batch"]
    assert {step for _, step in calls[0][1]} == set(range(1, 21)) and calls[1][1] == [("val_loss", 20)]
    client = _client(run_dir)
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.step)
    assert [m.step for m in history] == list(range(1, 21))
    assert all(a.timestamp < b.timestamp for a, b in zip(history[1:], history[2:]))  # each its own time

    monkeypatch.setattr(tracking, "SEND_EVERY_S", 0.0)
    calls.clear()
    _steps(emit, ctx, range(21, 24))
    tracking.flush()
    assert [{step for _, step in metrics} for _, metrics, _ in calls] == [{21}, {22}, {23}]
    emit("beitdist_on_train_end", context=ctx, step=23, metrics={}, final_dir=None)
    assert _history(client, run_id, "loss") == list(range(1, 24))


def test_batches_end_at_a_step_within_mlflow_limits(emit, tmp_path, monkeypatch, empty_store):
    """Steps of different sizes: a batch is sent before a step that would take it past MLflow's
    limits, so every call ends at a step; an event bigger than one
    call is split; every value reaches the store once and tracking stays on."""
    from mlflow.utils.validation import MAX_ENTITIES_PER_BATCH, MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

    run_dir, ctx, run_id = _started(emit, tmp_path, empty_store)
    calls = _record_calls(monkeypatch)
    monkeypatch.setattr(tracking, "SEND_EVERY_S", 3600.0)
    tracking._active.sent_at = time.monotonic()
    sizes = {1: 300, 2: 450, 3: 100, 4: 400, 5: 250}
    for step, size in sizes.items():
        emit("beitdist_on_step_end", context=ctx, step=step, metrics={f"m{i}": float(step) for i in range(size)})
    emit("beitdist_on_eval_end", context=ctx, step=5, metrics={f"v{i}": float(i) for i in range(2300)})
    tracking.flush()
    for _, metrics, tags in calls:
        assert len(metrics) <= MAX_METRICS_PER_BATCH and len(tags) <= MAX_PARAMS_TAGS_PER_BATCH
        assert len(metrics) + len(tags) <= MAX_ENTITIES_PER_BATCH
    steps = [sorted({step for _, step in metrics}) for _, metrics, _ in calls[:3]]
    assert steps == [[1, 2, 3], [4, 5], [5]] and [len(m) for _, m, _ in calls[:2]] == [850, 650]
    sent = [entry for _, metrics, _ in calls for entry in metrics]
    assert len(sent) == len(set(sent)) == sum(sizes.values()) + 2300
    assert tracking._active.enabled
    stored = _client(run_dir).get_run(run_id).data.metrics
    assert stored["m0"] == 5.0 and stored["m449"] == 2.0 and len([k for k in stored if k.startswith("v")]) == 2300
    assert _history(_client(run_dir), run_id, "m299") == [1, 2, 4]
    emit("beitdist_on_train_end", context=ctx, step=5, metrics={}, final_dir=None)


def test_kept_steps_are_written_before_a_failure_and_at_exit(emit, tmp_path, monkeypatch, empty_store):
    """A failing run sends its kept steps before the run is marked FAILED; a process exiting with
    steps kept writes them; events after the tracker closed are dropped, never raised."""
    run_dir, ctx, run_id = _started(emit, tmp_path, empty_store)
    calls = _record_calls(monkeypatch)
    monkeypatch.setattr(tracking, "SEND_EVERY_S", 3600.0)
    tracking._active.sent_at = time.monotonic()
    _steps(emit, ctx, range(1, 4))
    emit("beitdist_on_train_failed", context=ctx, step=3, error=RuntimeError("NCCL timeout"))
    (batch, _, _), (ended, status, _) = calls
    assert (batch, ended, status) == ("log_batch", "set_terminated", "FAILED")  # the steps first
    assert sorted({step for _, step in calls[0][1]}) == [1, 2, 3] and len(calls[0][1]) == 11  # NaN left out

    emit("beitdist_on_train_start", context=ctx)  # restarted
    tracking.flush()
    tracking._active.sent_at = time.monotonic()
    _steps(emit, ctx, range(4, 7))
    tracker = tracking._active
    tracking._drain_at_exit()
    assert _history(_client(run_dir), run_id, "loss") == [1, 2, 3, 4, 5, 6]
    _steps(emit, ctx, [7])  # a training thread still running after the exit handler
    emit("beitdist_on_eval_end", context=ctx, step=7, metrics={"val_loss": 0.1})
    tracker.submit(lambda: None)
    assert _history(_client(run_dir), run_id, "loss") == [1, 2, 3, 4, 5, 6]


def test_steps_with_nothing_after_them_are_sent_by_the_timer(emit, tmp_path, monkeypatch, empty_store):
    """The last steps before a hang (no step, no event after them) reach the store anyway."""
    run_dir, ctx, run_id = _started(emit, tmp_path, empty_store)
    monkeypatch.setattr(tracking, "SEND_EVERY_S", 0.4)
    tracking._active.sent_at = time.monotonic()
    _steps(emit, ctx, range(1, 4))
    deadline = time.monotonic() + 20
    while _history(_client(run_dir), run_id, "loss") != [1, 2, 3] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _history(_client(run_dir), run_id, "loss") == [1, 2, 3]
    emit("beitdist_on_train_end", context=ctx, step=3, metrics={}, final_dir=None)


@pytest.mark.parametrize("case", ["rank1", "disabled"])
def test_rank_1_and_disabled_tracking_log_nothing(emit, tmp_path, case):
    """Rank 1 (and a run with tracking off) logs nothing, writes nothing."""
    run_dir = tmp_path / "run"
    if case == "rank1":
        ctx = _context(run_dir, rank=1)
    else:
        ctx = _context(run_dir, tracking=FakeTracking(enabled=False))
    emit("beitdist_on_train_start", context=ctx)
    _steps(emit, ctx, [1])
    emit("beitdist_on_eval_end", context=ctx, step=1, metrics={"val_loss": 1.0})
    emit("beitdist_on_checkpoint_start", context=ctx, step=1)
    emit("beitdist_on_checkpoint_saved", context=ctx, step=1, path="x")
    emit("beitdist_on_train_end", context=ctx, step=1, metrics={}, final_dir=None)
    assert not run_dir.exists() and tracking._active is None


def test_unreachable_server_warns_once_and_training_goes_on(emit, tmp_path, caplog):
    """An unreachable server: nothing raises, one warning naming the URI, and it is quick."""
    import mlflow  # noqa: F401  (not timed: importing takes seconds on a busy machine)

    uri = f"http://127.0.0.1:{_free_port()}"
    ctx = _context(tmp_path / "run", tracking=FakeTracking(uri=uri))
    start = time.monotonic()
    with caplog.at_level(logging.WARNING):
        emit("beitdist_on_train_start", context=ctx)
        _steps(emit, ctx, range(1, 4))
        emit("beitdist_on_eval_end", context=ctx, step=3, metrics={"val_loss": 1.0})
        emit("beitdist_on_checkpoint_start", context=ctx, step=3)
        emit("beitdist_on_checkpoint_saved", context=ctx, step=3, path="x")
        emit("beitdist_on_train_end", context=ctx, step=3, metrics={}, final_dir=None)
    assert time.monotonic() - start < 10
    ours = [r for r in caplog.records if r.name == "beitdist.tracking"]
    assert len(ours) == 1 and uri in ours[0].getMessage(), caplog.text
    assert os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"] == "5"


def test_train_end_draws_segmentation_predictions(emit, tmp_path, empty_store):
    """A segmentation run: its predictions drawn over the inputs; the run ends FINISHED."""
    import beitdist

    config = beitdist.BackboneConfig(embed_dim=32, depth=4, num_heads=4, image_size=32, patch_size=8)
    model = beitdist.build_model(config, "segmentation", {"num_classes": 4, "auxiliary_channels": 8})
    run_dir = _with_store(tmp_path / "run", empty_store)
    ctx = TrainContext("seg", run_dir, 0, 1, FakeRecipe(head="segmentation"), model,
                       extras={"sample_batch": {"pixel_values": torch.randn(2, 3, 32, 32)}})
    emit("beitdist_on_train_start", context=ctx)
    emit("beitdist_on_train_end", context=ctx, step=0, metrics={}, final_dir=None)
    client = _client(run_dir)
    (run,) = _runs(client)
    assert run.info.status == "FINISHED" and model.training
    pictures = {a.path for a in client.list_artifacts(run.info.run_id, "pictures")}
    assert pictures == {f"pictures/{k}_{i}.png" for k in ("input", "prediction") for i in (0, 1)}


# ------------------------------------------------------------ real server
@pytest.mark.slow
def test_logging_through_a_real_mlflow_server(emit, tmp_path):
    from mlflow import MlflowClient

    port = _free_port()
    artifacts = tmp_path / "server_artifacts"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(artifacts), "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)
        run_dir = tmp_path / "run"
        ctx = _context(run_dir, tracking=FakeTracking(uri=uri))
        emit("beitdist_on_train_start", context=ctx)
        _steps(emit, ctx, range(1, 4))
        emit("beitdist_on_eval_end", context=ctx, step=3, metrics={"val_loss": 0.3})
        final = run_dir / "final"
        final.mkdir(parents=True)  # the run dir may not exist yet: the tracker makes it on its own thread
        (final / "config.json").write_text("{}")
        emit("beitdist_on_train_end", context=ctx, step=3, metrics={}, final_dir=final)
        assert tracking._active is None

        client = MlflowClient(uri)
        (run,) = _runs(client)
        assert run.info.status == "FINISHED" and run.data.params["optim.lr"] == "0.001"
        assert _history(client, run.info.run_id, "loss") == [1, 2, 3]
        assert {a.path for a in client.list_artifacts(run.info.run_id)} == {"recipe.yaml", "final", "pictures"}
        assert next(artifacts.rglob("config.json")).read_text() == "{}"
        assert not (run_dir / "mlflow.db").exists()
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the group this test started: the server and its workers
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_a_new_sqlite_store_appears_whole_or_not_at_all(tmp_path, monkeypatch):
    """MLflow builds a new store in place for seconds; a run stopped meanwhile must not leave a
    half-built database behind (every later open would fail on it)."""
    import mlflow

    db = tmp_path / "run" / "mlflow.db"
    real_search = mlflow.MlflowClient.search_experiments

    def interrupted(self, *args, **kwargs):
        real_search(self, *args, **kwargs)  # the scratch store exists and is migrated...
        raise KeyboardInterrupt  # ...when the run is stopped

    monkeypatch.setattr(mlflow.MlflowClient, "search_experiments", interrupted)
    with pytest.raises(KeyboardInterrupt):
        tracking.create_sqlite_store(f"sqlite:///{db}")
    assert list(db.parent.iterdir()) == []
    monkeypatch.setattr(mlflow.MlflowClient, "search_experiments", real_search)
    tracking.create_sqlite_store(f"sqlite:///{db}")
    assert [p.name for p in db.parent.iterdir()] == ["mlflow.db"]
    assert [e.name for e in mlflow.MlflowClient(f"sqlite:///{db}").search_experiments()] == ["Default"]
    tracking.create_sqlite_store(f"sqlite:///{tmp_path / 'other.db'}?timeout=20")  # driver options: MLflow's job
    assert not (tmp_path / "other.db").exists()


def test_scratch_stores_left_by_killed_runs_are_removed_later(tmp_path):
    """A SIGKILL during the build skips the clean-up; the next run removes what is old enough
    to be nobody's build any more, and leaves a build that may still be in progress."""
    db = tmp_path / "mlflow.db"
    stale, fresh = tmp_path / ".mlflow.db.0badc0de.tmp", tmp_path / ".mlflow.db.cafe.tmp"
    other = tmp_path / ".other.db.0badc0de.tmp"
    for scratch in (stale, fresh, other):
        scratch.write_bytes(b"half a database")
    old = time.time() - tracking.STALE_SCRATCH_S - 60
    os.utime(stale, (old, old))
    os.utime(other, (old, old))
    tracking.create_sqlite_store(f"sqlite:///{db}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["mlflow.db", fresh.name, other.name])
    os.utime(fresh, (old, old))
    tracking.create_sqlite_store(f"sqlite:///{db}")  # an existing store: stale scratch goes all the same
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["mlflow.db", other.name])
