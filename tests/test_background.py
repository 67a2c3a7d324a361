"""beitdist.background.OrderedWorker: calls run in order on one thread, drain/close wait for them,
a failing call does not stop the ones after it."""

from __future__ import annotations

import threading
import time

import pytest

from beitdist.background import OrderedWorker


def test_calls_run_in_order_on_one_other_thread_and_drain_waits():
    worker = OrderedWorker("test-worker")
    seen, threads = [], set()

    def call(i):
        time.sleep(0.01 if i % 2 else 0)
        seen.append(i)
        threads.add(threading.current_thread().name)

    for i in range(10):
        worker.submit(lambda i=i: call(i))
    assert worker.drain(timeout=10)
    assert seen == list(range(10)) and threads == {"test-worker"}
    assert worker.close(timeout=10)


def test_a_failing_call_is_logged_and_the_next_ones_run(caplog):
    worker = OrderedWorker("test-worker")
    seen = []
    worker.submit(lambda: 1 / 0)
    worker.submit(lambda: seen.append("after"))
    assert worker.close(timeout=10)
    assert seen == ["after"] and "ZeroDivisionError" in caplog.text
    with pytest.raises(RuntimeError, match="submit after close"):
        worker.submit(lambda: None)


def test_drain_and_close_time_out_on_a_stuck_call():
    worker = OrderedWorker("test-worker")
    release = threading.Event()
    worker.submit(release.wait)
    assert not worker.drain(timeout=0.1)
    assert not worker.close(timeout=0.1)
    release.set()
    worker._thread.join(10)
    assert not worker._thread.is_alive()


def test_drain_after_close_waits_for_the_queue_and_a_base_exception_does_not_end_the_thread():
    worker = OrderedWorker("test-worker")
    seen = []
    release = threading.Event()
    worker.submit(release.wait)

    def exits():
        raise SystemExit(3)

    worker.submit(exits)
    worker.submit(lambda: seen.append("after"))
    assert not worker.close(timeout=0.05)  # still blocked in the first call
    assert not worker.drain(timeout=0.05)
    release.set()
    assert worker.drain(timeout=10) and seen == ["after"]


def test_forking_waits_for_the_call_in_progress_and_holds_back_the_next():
    """DataLoader workers are forked inside `forking()`: never while the background thread is in
    a call (which may be importing: a child forked then can hang on that module's import lock)."""
    from beitdist.background import forking

    worker = OrderedWorker("test-worker")
    started, release, order = threading.Event(), threading.Event(), []
    worker.submit(lambda: (started.set(), release.wait(10), order.append("first call")))
    assert started.wait(10)
    threading.Timer(0.3, release.set).start()
    with forking():
        order.append("fork")
        worker.submit(lambda: order.append("next call"))
        time.sleep(0.2)  # the next call is queued but must not start while forking
        order.append("forked")
    assert worker.close(timeout=10)
    assert order == ["first call", "fork", "forked", "next call"]


def test_loader_workers_are_forked_outside_background_calls():
    """A loader with worker processes waits for the running background call before forking them;
    one without workers (nothing forked) does not wait."""
    from beitdist.data.pipeline import build_loaders

    digits = {"dataset": "digits", "batch_size": 8, "augment": {"mixup": 0.0, "cutmix": 0.0}}
    worker = OrderedWorker("test-worker")
    release = threading.Event()
    worker.submit(lambda: release.wait(10))
    time.sleep(0.1)
    try:
        in_process = build_loaders(digits, "classification", 32, 8)[0]
        start = time.monotonic()
        next(iter(in_process))
        assert time.monotonic() - start < 5
        with_workers = build_loaders({**digits, "num_workers": 1}, "classification", 32, 8)[0]
        threading.Timer(1.0, release.set).start()
        start = time.monotonic()
        next(iter(with_workers))
        assert time.monotonic() - start >= 0.8
    finally:
        release.set()
        assert worker.close(timeout=10)
