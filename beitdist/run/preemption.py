"""Pre-emption: SIGTERM ends a training run at a step boundary, with a checkpoint at that step.

Why: Kubernetes, Slurm and spot-instance reclaim send SIGTERM, wait a grace period (30 s by default
on Kubernetes) and then SIGKILL. Dying at once would lose every step since the last periodic
checkpoint. Instead the handler only records the request; the training loop asks every rank once
per micro-batch (folded into the all-reduce it already does, `Trainer._all_finite`), so all ranks
agree on the step to stop at even when only one of them was signalled; they finish it, save a
checkpoint of it and end with `PreemptedError`, and a relaunch (or Ray's worker-group restart)
resumes from it.

A second SIGTERM during that save is logged and ignored: the save finishes and is committed, or,
if a SIGKILL cuts it, the checkpoint has no manifest and `latest` still names the previous one
(`beitdist.run.checkpoints`). SIGKILL remains the way to stop at once.

Where the handler goes: `beitdist train` installs it in its main thread (`install`). In a Ray
worker the training loop runs in a thread of its own and Ray installs its own SIGTERM handler
(exit at once) in the main thread just before the worker's task loop, after the runtime_env setup
hook ran; the hook (`beitdist.ray_worker_setup`) therefore has Ray install `ray_sigterm_handler`
instead, which records the request while a training loop is active in that process and otherwise
hands over to Ray's handler.

Standard library only: the Ray hook imports it in every Ray process.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

log = logging.getLogger("beitdist.train")

_requested = threading.Event()
_active = threading.Event()
"""A training loop runs in this process: SIGTERM is recorded instead of ending the process."""


def requested() -> bool:
    """Whether a SIGTERM arrived since the loop started."""
    return _requested.is_set()


def _record(signum: int, frame: FrameType | None) -> None:
    if _requested.is_set():
        log.warning("signal %d again: the step and its checkpoint are finished first (SIGKILL stops at once; the "
                    "last complete checkpoint is kept either way)", signum)
        return
    _requested.set()
    log.warning("signal %d: stopping after this step with a checkpoint (pre-emption)", signum)


def install() -> bool:
    """Record SIGTERM in this process (main thread only; a no-op elsewhere). Returns whether it did."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _record)
    return True


class training:  # noqa: N801 - used as `with preemption.training():`
    """While a training loop runs: SIGTERM is a request to stop at a step boundary."""

    def __enter__(self) -> None:
        _requested.clear()
        _active.set()

    def __exit__(self, *exc: Any) -> None:
        _active.clear()


def ray_sigterm_handler(ray_handler: Callable[[int, FrameType | None], Any]) -> Callable[[int, FrameType | None], Any]:
    """Ray's SIGTERM handler for a worker process, wrapped: while a training loop is active the
    signal is recorded; otherwise Ray's handler runs (the process exits as Ray intends)."""

    def handler(signum: int, frame: FrameType | None) -> Any:
        if _active.is_set():
            _record(signum, frame)
            return None
        return ray_handler(signum, frame)

    return handler
