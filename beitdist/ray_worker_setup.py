"""What every Ray worker process of a launch runs first (runtime_env `worker_process_setup_hook`).

Why: a launch prints the output of every Ray process. Three sources of it are noise a user can do
nothing about and that reads like a failure:
- Ray Train 2.x's PlacementGroupCleaner asks the State API every second whether the controller is
  alive; the State API lives in Ray's dashboard, which a plain `ray` install (beitdist's
  dependency) does not have, so every ask fails with a warning (dozens per run). It only matters
  when the controller itself dies, which Ray reports on its own.
- DeepSpeed calls torch's deprecated `all_gather_into_tensor`, a FutureWarning on every save.
- MLflow announces at INFO that it creates the tables of a new sqlite store.

Ray Train's own INFO lines (the worker group's set-up) are turned off by the launcher through Ray
Train's `RunConfig(logging_config=...)`, not here: Ray Train configures its `ray.train` loggers
after this hook runs. One is outside that tree: the line per `ray.train.report` call ("Reporting
training result N: TrainingReport(...)", from every rank) comes from a logger named by its file's
path (ray/train/v2/_internal/execution/context.py: `logging.getLogger(__file__)`), so this hook
sets that logger to WARNING. `VERBOSE_ENV` tells every process of a verbose launch
(`beitdist -v launch`) to keep all of it.

It also binds the collectives to the interface of the Ray node's address (`beitdist.network`:
on a real cluster gloo would otherwise advertise 127.0.1.1), and makes SIGTERM a request to stop at a step boundary with a checkpoint while a training
loop runs in the process (pre-emption, `beitdist.run.preemption`): Ray installs its own SIGTERM
handler (exit at once) right after this hook, so the hook wraps the function Ray installs it with.

This module imports only the standard library: most Ray processes of a launch never train and
must not pay for importing torch.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from typing import Any

VERBOSE_ENV = "BEITDIST_VERBOSE"
"""Set to 1 in the workers' environment by a verbose launch: every process logs at INFO."""
QUIET_LOGGERS = {"ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
                 "mlflow.store.db.utils": logging.WARNING}
IGNORED_WARNINGS = ((FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),)


def verbose() -> bool:
    return os.environ.get(VERBOSE_ENV) == "1"


def _report_logger_name() -> str | None:
    """The name of Ray Train's per-report logger (its module's file path), without importing Ray
    Train: this hook runs in every Ray process."""
    ray_file = getattr(sys.modules.get("ray"), "__file__", None)
    if not ray_file:
        return None
    return os.path.join(os.path.dirname(ray_file), "train", "v2", "_internal", "execution", "context.py")


def setup_worker() -> None:
    """The runtime_env `worker_process_setup_hook` of a launch."""
    quiet_ray_internals()
    intercept_sigterm()
    bind_to_node_address()
    controller_liveness_from_gcs()


def controller_liveness_from_gcs() -> None:
    """Ray Train's `PlacementGroupCleaner` (a detached actor per run) frees the run's workers once
    its controller is dead, and asks the dashboard's state API whether it is. beitdist starts
    local Ray instances without a dashboard, where that call always fails and the cleaner never
    frees anything: a sweep's trial stopped early (its controller killed with it) would keep its
    workers' CPUs reserved and the next trials would wait forever. The answer comes from the GCS,
    which every Ray instance has. A private Ray module; tests/test_tune.py pins the behaviour."""
    try:
        import ray._private.state as gcs
        from ray.train.v2._internal.execution.controller import placement_group_cleaner
    except ImportError:  # another Ray release: its own liveness check stays
        return

    def is_actor_alive(actor_id: str, timeout: float) -> bool:
        info = gcs.actors(actor_id=actor_id)
        return bool(info) and info.get("State") != "DEAD"

    placement_group_cleaner.is_actor_alive = is_actor_alive


def bind_to_node_address() -> None:
    """Collectives on the interface of this Ray node's address (`beitdist.network`): set here,
    before Ray Train creates the torch process group in this process, and only where the user
    (or `ray start`'s environment) left the variables unset."""
    from beitdist.network import bind_collectives

    ray = sys.modules.get("ray")
    try:
        address = ray.util.get_node_ip_address() if ray is not None else None
    except Exception:  # noqa: BLE001 - not connected yet: the libraries' defaults stay
        address = None
    chosen = bind_collectives(address)
    if chosen:
        logging.getLogger("beitdist.network").info("collectives bound to %s (the interface of node address %s)",
                                                    chosen.get("GLOO_SOCKET_IFNAME", "?"), address)


def intercept_sigterm() -> None:
    """Have Ray's own SIGTERM handler wrapped by `preemption.ray_sigterm_handler` when Ray
    installs it (in the worker's main thread, just before its task loop)."""
    from beitdist.run import preemption

    utils = sys.modules.get("ray._private.utils")
    install = getattr(utils, "set_sigterm_handler", None)
    if install is None or getattr(install, "beitdist_wrapped", False):
        return

    def set_sigterm_handler(handler: Any) -> None:
        install(preemption.ray_sigterm_handler(handler))

    set_sigterm_handler.beitdist_wrapped = True  # type: ignore[attr-defined]
    setattr(utils, "set_sigterm_handler", set_sigterm_handler)


def quiet_ray_internals() -> None:
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    report_logger = _report_logger_name()
    if report_logger is not None and not verbose():
        logging.getLogger(report_logger).setLevel(logging.WARNING)
    for category, message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
