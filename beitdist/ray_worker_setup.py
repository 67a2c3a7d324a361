"""What every Ray worker process of a launch runs first (runtime_env `worker_process_setup_hook`).

Why: a launch prints the output of every Ray process. Three sources of it are noise a user can do
nothing about and that reads like a failure:
- Ray Train 2.x's PlacementGroupCleaner asks the State API every second whether the controller is
  alive; the State API lives in Ray's dashboard, which a plain `ray` install (beitdist's
  dependency) does not have, so every ask fails with a warning (dozens per run). It only matters
  when the controller itself dies, which Ray reports on its own.
- DeepSpeed calls torch's deprecated `all_gather_into_tensor`, a FutureWarning on every save.
- MLflow announces at INFO that it creates the tables of a new sqlite store.

This module imports only the standard library: most Ray processes of a launch never train and
must not pay for importing torch.
"""

from __future__ import annotations

import logging
import warnings

QUIET_LOGGERS = {"ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.ERROR,
                 "mlflow.store.db.utils": logging.WARNING}
IGNORED_WARNINGS = ((FutureWarning, r"`torch\.distributed\.all_gather_into_tensor` is deprecated"),)


def quiet_ray_internals() -> None:
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for category, message in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
