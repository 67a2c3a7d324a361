"""One background thread that runs calls in the order they were submitted.

Why: the training loop must not wait for bookkeeping that talks to disks or servers (MLflow's
sqlite migrations take seconds, an HTTP `log_batch` tens of milliseconds), and every rank waits
for the slowest one at the next collective. Calls keep their order (a run is created before its
metrics are logged) and a caller that needs them done (a checkpoint, the end of training) waits
with `drain`.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

_STOP = object()


class OrderedWorker:
    """A daemon thread consuming a FIFO of zero-argument calls. A call that raises is logged
    (the submitter decides what failures mean by wrapping its calls) and the thread goes on."""

    def __init__(self, name: str) -> None:
        self._calls: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, call: Callable[[], None]) -> None:
        if self._closed:
            raise RuntimeError(f"{self._thread.name}: submit after close")
        self._calls.put(call)

    def drain(self, timeout: float | None = None) -> bool:
        """Wait until every call submitted so far has run; False when `timeout` ran out first."""
        if not self._thread.is_alive():
            return self._calls.empty()
        done = threading.Event()
        self._calls.put(done.set)
        return done.wait(timeout)

    def close(self, timeout: float | None = None) -> bool:
        """Run what is queued, then end the thread; False when `timeout` ran out first (the
        daemon thread is then left to finish or die with the process)."""
        if self._closed:
            return not self._thread.is_alive()
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
                call()
            except Exception:  # the submitter's wrapper reports its own failures; this is a last resort
                log.exception("%s: a background call failed", self._thread.name)
