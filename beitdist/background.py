"""One background thread that runs calls in the order they were submitted.

Why: the training loop must not wait for bookkeeping that talks to disks or servers (MLflow's
sqlite migrations take seconds, an HTTP `log_batch` tens of milliseconds), and every rank waits
for the slowest one at the next collective. Calls keep their order (a run is created before its
metrics are logged) and a caller that needs them done (a checkpoint, the end of training) waits
with `drain`.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

_STOP = object()

_FORK_GUARD = threading.Lock()
"""Held by a worker thread while it runs a call, and by `forking()`. A process forked while
another thread is inside an import (MLflow's calls import modules lazily, seconds of them when a
run starts) inherits that module's import lock held by a thread that does not exist in the child:
the child hangs the first time it imports the same module. DataLoader workers are such children,
forked at every epoch and evaluation."""


@contextlib.contextmanager
def forking() -> Iterator[None]:
    """Around code that forks Python processes that go on running Python (DataLoader workers):
    waits for the background call in progress, if any, and keeps the next one from starting until
    the fork is done. Calls are short, except MLflow's start (its import and store set-up, a few
    seconds once per run)."""
    with _FORK_GUARD:
        yield


class OrderedWorker:
    """A daemon thread consuming a FIFO of zero-argument calls. A call that raises is logged
    (the submitter decides what failures mean by wrapping its calls) and the thread goes on: it
    ends only at `close`, so a waiting `drain` is always answered."""

    def __init__(self, name: str) -> None:
        self._calls: queue.Queue = queue.Queue()
        self._lock = threading.Lock()  # `_closed` and what is put on the queue change together
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self._thread.name}: submit after close")
            self._calls.put(call)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every call submitted so far has run; False when `timeout` ran out first."""
        done = threading.Event()
        with self._lock:
            queued = not self._closed
            if queued:
                self._calls.put(done.set)
        if queued:
            return done.wait(timeout)
        self._thread.join(timeout)  # closed: the thread runs what is queued, then ends
        return not self._thread.is_alive()

    def close(self, timeout: float | None = None) -> bool:
        """Run what is queued, then end the thread; False when `timeout` ran out first (the
        daemon thread is then left to finish or die with the process)."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._calls.put(_STOP)
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        while True:
            call = self._calls.get()
            if call is _STOP:
                return
            try:
                with _FORK_GUARD:
                    call()
            except BaseException:  # noqa: BLE001 -- the thread must outlive any call (see the class docstring)
                log.exception("%s: a background call failed", self._thread.name)
