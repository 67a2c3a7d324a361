"""Checks of a valid recipe against this machine and the run directory, before compute is spent.

The recipe schema catches what is wrong with a recipe on its own; these catch what is wrong with
running it HERE and NOW, which otherwise surfaces as a rank traceback after the first steps (a
label out of range), at the first checkpoint (a read-only output_dir, 150 steps thrown away), inside
DeepSpeed (fp16 on a CPU) or as a 100-line `size mismatch` when a run name is reused for another
model. `validate`, `train` and `launch` run them all before any process or Ray instance starts;
each problem is one `InputError` naming the recipe field and what to do. A tracking server that
does not answer is only a warning: training does not need it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any

from beitdist.errors import InputError
from beitdist.recipe import Recipe
from beitdist.run.rundir import RunDir

log = logging.getLogger(__name__)

WEIGHT_BYTES, OPTIMIZER_BYTES = 8, 12
"""Disk per parameter of one checkpoint: the module's weights and the consolidated fp32 `final/`
(4 + 4, rounded up from bf16's 2), and, per trainable parameter, DeepSpeed's fp32 master weights
and two Adam moments."""


class PreflightError(InputError):
    """A valid recipe that cannot run here (data, output directory, devices, an earlier run)."""


def check_labels(recipe: Recipe, this_machine: bool = True) -> None:
    """The dataset's number of classes must fit the head's: a label >= num_classes would only fail
    in the loss, on every rank, after the first batch. Without `this_machine` a dataset whose
    classes are read from disk that is not here is not counted."""
    head_classes = getattr(recipe.head_options(), "num_classes", None)
    if head_classes is None:
        return
    from beitdist.plugins import dataset_class

    counter = getattr(dataset_class(recipe.data.dataset), "num_classes", None)
    try:
        data_classes = counter(recipe.dataset_options()) if callable(counter) else None
    except (OSError, InputError):
        if this_machine:
            raise
        return
    if data_classes is not None and data_classes > head_classes:
        raise PreflightError(
            f"head.options.num_classes: {head_classes}, but the dataset {recipe.data.dataset!r} has {data_classes} "
            f"classes (labels 0..{data_classes - 1}); set head.options.num_classes: {data_classes}")


def _nearest_existing(path: Path) -> Path:
    for candidate in [path, *path.parents]:
        if candidate.exists():
            return candidate
    return Path(os.sep)


def checkpoint_disk_bytes(recipe: Recipe) -> int:
    """Disk one checkpoint of this recipe's model takes (all ranks' shards together)."""
    from beitdist.plan import count_parameters

    params = count_parameters(recipe.model.backbone_config(), recipe.head.name, recipe.head.options,
                              recipe.model.freeze)
    return int(params) * WEIGHT_BYTES + params.trainable * OPTIMIZER_BYTES


def check_run_dir_writable(recipe: Recipe) -> None:
    """output_dir must be a directory this process can write (a probe file, removed at once) with
    room for one checkpoint; nothing is created when it does not exist yet."""
    run_dir = recipe.run_dir
    where = _nearest_existing(run_dir)
    if not where.is_dir():
        raise PreflightError(f"output_dir: {where} is a file, not a directory; the run would write {run_dir}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".beitdist-probe-", dir=where)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise PreflightError(f"output_dir: cannot write in {where} ({err.strerror or err}); the run would write "
                             f"{run_dir}; choose a writable output_dir") from None
    needed = checkpoint_disk_bytes(recipe)
    free = shutil.disk_usage(where).free
    if free < needed:
        raise PreflightError(f"output_dir: {where} has {free / 1024**3:.2f} GiB free, one checkpoint of this model "
                             f"needs ~{needed / 1024**3:.2f} GiB; free space or choose another output_dir")
    final = RunDir(run_dir).final
    if final.exists():  # rewritten at the end of the run: a stray file there would fail it then
        from beitdist.output_paths import OutputError, check_output_dir

        try:
            check_output_dir(final, "beitdist", overwrite=True, run_owned=True)
        except OutputError as err:
            raise PreflightError(f"output_dir: the run's final weights cannot be rewritten: {err}") from None


def check_remote_output(recipe: Recipe) -> None:
    """An object-store output_dir: the store answers and takes a write (one probe object, removed
    at once), before any compute."""
    if recipe.run_url is None:
        return
    from beitdist.run.storage import RemoteRun

    try:
        RemoteRun(recipe.run_url, recipe.run_dir, recipe.storage.options).probe()
    except InputError as err:
        raise PreflightError(str(err)) from None


def _recorded_recipe(run_dir: Path) -> tuple[dict[str, Any], Path] | None:
    """The recipe saved with the run's newest complete checkpoint (None for a new run)."""
    from beitdist.run.checkpoints import complete_tags

    layout = RunDir(run_dir)
    ckpt_dir = layout.checkpoints
    if not ckpt_dir.is_dir():
        return None
    for tag in complete_tags(ckpt_dir, quiet=True):
        state_file = layout.state_file(tag)
        try:
            return json.loads(state_file.read_text())["recipe"], state_file
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def _meta_model(recipe: Recipe) -> Any:
    """The recipe's model without memory (parameters on the meta device)."""
    import torch

    from beitdist.model import build_model

    with torch.device("meta"):
        return build_model(recipe.model.backbone_config(), recipe.head.name, recipe.head.options)


def _shapes(recipe: Recipe) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in _meta_model(recipe).state_dict().items()}


def check_freeze(recipe: Recipe) -> None:
    """Every `model.freeze` pattern selects parameters of this model, and something still trains."""
    if recipe.model.freeze:
        from beitdist.freeze import frozen_names

        frozen_names([name for name, _ in _meta_model(recipe).named_parameters()], recipe.model.freeze)


def check_resumable(recipe: Recipe) -> None:
    """A run directory that already holds checkpoints is resumed: its model must be this recipe's."""
    recorded = _recorded_recipe(recipe.run_dir)
    if recorded is None:
        return
    data, state_file = recorded
    from beitdist.recipe import parse_recipe

    try:
        before = parse_recipe(data, str(state_file))
    except (InputError, TypeError, KeyError) as err:
        log.warning("cannot compare with the recipe recorded in %s (%s); resuming as is", state_file, err)
        return
    if tuple(before.model.freeze) != tuple(recipe.model.freeze):  # the optimizer's groups would not match
        raise PreflightError(
            f"model.freeze: the run {recipe.run_dir} was trained with model.freeze {list(before.model.freeze)}, "
            f"now {list(recipe.model.freeze)}; its optimizer state cannot be resumed: use a new name (--set name=...) "
            "and model.init from this run's final weights")
    old, new = _shapes(before), _shapes(recipe)
    if old == new:
        return
    changed = sorted(k for k in old.keys() & new.keys() if old[k] != new[k])
    diff = (f"{changed[0]} is {list(old[changed[0]])} there, {list(new[changed[0]])} now" if changed else
            f"{len(old.keys() ^ new.keys())} tensors differ")
    raise PreflightError(
        f"name: the run {recipe.run_dir} was trained with another model ({diff}); it cannot be resumed with this "
        f"recipe: use a new name (--set name=...) or output_dir")


def check_precision(recipe: Recipe, gpu: bool | None) -> None:
    """fp16 needs CUDA (DeepSpeed has no fp16 on CPU). `gpu` is what the workers will use; None
    when it cannot be known here (a cluster whose devices the launch has not seen yet)."""
    if gpu is False and recipe.engine.precision == "fp16":
        raise PreflightError(
            "engine.precision: fp16 needs GPUs (DeepSpeed has no fp16 on CPU) and this run's workers use CPUs "
            f"(scaling.use_gpu: {recipe.scaling.use_gpu}); use bf16 or fp32")


_warned: set[str] = set()


def check_tracking(recipe: Recipe, timeout_s: float = 2.0) -> None:
    """A tracking server that does not answer is a warning (once per URI): the run goes on and
    logs nothing, rather than failing minutes in."""
    if not recipe.tracking.enabled:
        return
    from beitdist.extras import require

    require("mlflow", "tracking (tracking.enabled: true; set it to false to train without MLflow)")
    uri = recipe.tracking.uri
    if not uri:
        return
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or uri in _warned:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname or "localhost", port), timeout=timeout_s).close()
    except OSError as err:
        _warned.add(uri)
        log.warning("tracking.uri: %s does not answer (%s); the run will train but may log nothing to MLflow",
                    uri, err.strerror or err)


def preflight(recipe: Recipe, *, this_machine: bool = True, gpu: bool | None = None) -> None:
    """Every check, in the order a user would fix them. `this_machine=False` (validate/launch
    `--skip-paths`, `launch --dry-run`) skips what depends on this machine's disks and devices."""
    check_tracking(recipe)
    check_freeze(recipe)
    check_labels(recipe, this_machine)
    if not this_machine:
        return
    check_precision(recipe, gpu)
    check_run_dir_writable(recipe)
    check_remote_output(recipe)
    check_resumable(recipe)
