"""beitdist's hook specifications: the whole plugin contract in one place.

Plugins implement these with `@beitdist.hookimpl` in a module that a setuptools entry point of the
group `beitdist` names (built-ins are declared the same way). Registration hooks are called once
per plugin manager, in the process that builds the model (every Ray worker builds its own), and
receive a registry whose `add` validates each entry; training-event hooks are called on every
rank as the run progresses.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from beitdist.events import TrainContext
    from beitdist.plugins import Registry

PROJECT = "beitdist"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ----------------------------------------------------------------- registration
@hookspec
def beitdist_register_heads(registry: Registry) -> None:
    """Add head classes with `registry.add(MyHead)`.

    Called once when the plugin manager is built. Each class must subclass `beitdist.heads.Head`
    and declare `name`, `Options` (a dataclass) and `needs`, and implement `forward` and `loss`;
    a duplicate name or a missing piece raises a PluginError naming the plugin and its package.
    What else beitdist asks a head (its batches' `data_needs`, `evaluate_batch`, `pictures`,
    conversion KeyMaps) has defaults; see `beitdist.heads.base`.
    """


@hookspec
def beitdist_register_tokenizers(registry: Registry) -> None:
    """Add visual tokenizer classes (MIM targets) with `registry.add(MyTokenizer)`.

    Called once when the plugin manager is built. Each class must subclass
    `beitdist.tokenizers.Tokenizer` (name, Options, `encode(images) -> token ids`).
    """


@hookspec
def beitdist_register_datasets(registry: Registry) -> None:
    """Add dataset classes with `registry.add(MyDataset)`.

    Called once when the plugin manager is built. Each class must subclass
    `beitdist.data.DatasetPlugin` (name, Options, `build(options, split, ...)`).
    """


# ------------------------------------------------------------ training events
@hookspec
def beitdist_on_train_start(context: TrainContext) -> None:
    """Called on every rank once the model, data and engine are ready, before the first step
    (also after a restart, with `context.extras["resumed_step"]` set)."""


@hookspec
def beitdist_on_step_end(context: TrainContext, step: int, metrics: dict[str, Any]) -> None:
    """Called on every rank after each optimizer step; `metrics` holds this step's loss, lr,
    grad norm, images/s and data_s (seconds it waited for its input; rank-local values)."""


@hookspec
def beitdist_on_eval_end(context: TrainContext, step: int, metrics: dict[str, float]) -> None:
    """Called on every rank after each evaluation, with the metrics reduced across ranks."""


@hookspec
def beitdist_on_checkpoint_start(context: TrainContext, step: int) -> None:
    """Called on every rank before checkpoint step_`step` is written. A callback that buffers
    records (metrics queued for a server, an open file) makes them durable here: a run resumed
    from this checkpoint replays only the steps after it, so anything still buffered would be lost."""


@hookspec
def beitdist_on_checkpoint_saved(context: TrainContext, step: int, path: str) -> None:
    """Called on every rank after a checkpoint is completely written (every rank's shard) at `path`."""


@hookspec
def beitdist_on_train_failed(context: TrainContext, step: int, error: BaseException) -> None:
    """Called on every rank whose training loop stops with an exception (after set-up; also
    Ctrl-C under torchrun), before the exception propagates. Callbacks that buffer records write
    them here and may mark their run failed; they must not raise. Not called for a process that
    is killed (SIGKILL, a Ray restart): a restart resumes from the last checkpoint and replays."""


@hookspec
def beitdist_on_train_end(context: TrainContext, step: int, metrics: dict[str, float], final_dir: str | None) -> None:
    """Called on every rank once the last step is done and checkpointed, with the last evaluation's
    metrics; `final_dir` (rank 0 only, else None) holds the consolidated fp32 weights, loadable
    with `beitdist.load_model`. Not called when a run stops early (`train.stop_at`) or fails."""


def _spec_names(prefix: str) -> tuple[str, ...]:
    """The hook specifications of this module whose names start with `prefix`, in source order:
    the lists below follow the specs, so a new hook needs no second edit."""
    marker = f"{PROJECT}_spec"
    return tuple(name for name, obj in list(globals().items())
                 if name.startswith(prefix) and callable(obj) and hasattr(obj, marker))


REGISTRATION_HOOKS = _spec_names("beitdist_register_")
EVENT_HOOKS = _spec_names("beitdist_on_")
