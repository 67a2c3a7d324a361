"""The recipe: one YAML document describing a whole run, parsed into typed, validated sections.

Errors name the file, the field path, the bad value and what is allowed (with a did-you-mean for
misspelt keys); when the bad value came from an inherited file or a `--set`, they say so. Only a
plain dict crosses process boundaries (Ray); every worker re-parses it.

Loading a file (`load_recipe`) goes: read YAML -> resolve `inherit:` (a base recipe, path relative
to the file; chains allowed, cycles refused) by deep merge (child wins, lists replaced; a section
that names a different head / tokenizer / dataset drops the base's `options`) -> `--set`
overrides -> `parse_recipe`: the schema and the consistency between engine, data and scaling (pure:
no plugin registry, no disk), then `Recipe.check_plugins` (plugin names and the plugins' own option
schemas). Checks against this machine (data paths, output_dir, devices) are `beitdist.preflight`'s.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from beitdist.backbone.config import VARIANTS, BackboneConfig, variant
from beitdist.data.pipeline import DataConfig
from beitdist.engines.config import EngineConfig
from beitdist.errors import InputError
from beitdist.heads import DEFAULT_HEAD
from beitdist.optim import OptimConfig
from beitdist.schema import OptionsError, check, parse, to_dict

INHERIT_KEY = "inherit"
PLUGIN_SECTIONS: dict[str, str] = {"head": "name", "tokenizer": "name", "data": "dataset"}
"""Sections whose `options` belong to the plugin named by the given key: a child recipe that names
another plugin starts from empty options instead of merging the base's."""

Origins = dict[tuple[str, ...], str]
"""Where each value of a merged recipe document came from: key path -> file (or `--set K=V`)."""


_LINE_BREAKS = {ord(c): c.encode("unicode_escape").decode() for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


class RecipeError(InputError):
    """A recipe that cannot run; the message starts with the file and field path, on ONE line
    (line breaks inside keys or values are shown escaped)."""

    def __init__(self, message: str) -> None:
        super().__init__(str(message).translate(_LINE_BREAKS))


@dataclass(frozen=True)
class ModelSection:
    variant: str = "tiny"
    """Named backbone size (tiny, small, base, large, huge) that `backbone` fields override."""
    backbone: dict[str, Any] = field(default_factory=dict)
    """BackboneConfig fields (image_size, patch_size, depth, rel_pos_bias, drop_path_rate, ...)."""
    init: str | None = None
    """Checkpoint to start from (unilm .pth, transformers dir, timm, beitdist): its weights are
    adapted to this model (resolution, shared -> per-block tables, new head)."""
    trust_pickle: bool = False
    freeze: tuple[str, ...] = ()
    """Parameters kept fixed (no gradient, no optimizer state, no weight decay): 'backbone',
    'head', or globs on parameter names ('backbone.blocks.[0-5].*'). `[backbone]` is BEiT's linear
    probe."""

    def __post_init__(self) -> None:
        check(self.variant in VARIANTS, "variant", f"got {self.variant!r}; allowed: {', '.join(VARIANTS)}")
        check(self.init is None or bool(self.init.strip()), "init", "expected a checkpoint path or null")
        check(all(isinstance(p, str) and p.strip() for p in self.freeze), "freeze",
              f"expected a list of parameter patterns, e.g. [backbone], got {list(self.freeze)!r}")

    def backbone_config(self) -> BackboneConfig:
        allowed = [f.name for f in dataclasses.fields(BackboneConfig)]
        for key in self.backbone:
            if key not in allowed:
                hint = difflib.get_close_matches(str(key), allowed, n=1)
                suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
                raise OptionsError(f"backbone.{key}", f"unknown option{suggestion}; allowed: {', '.join(allowed)}")
        try:
            return variant(self.variant, **self.backbone)
        except (ValueError, TypeError) as err:  # ConfigError is a ValueError
            message = str(err).removeprefix("backbone.").removeprefix("backbone: ")
            field_name, sep, rest = message.partition(": ")
            if sep and re.fullmatch(r"[a-z_]+", field_name):
                raise OptionsError(f"backbone.{field_name}", rest) from None
            raise OptionsError("backbone", message) from None


@dataclass(frozen=True)
class HeadSection:
    name: str = DEFAULT_HEAD
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenizerSection:
    name: str | None = None
    """Visual tokenizer for MIM targets (dalle, codebook, or a plugin); required by a head whose
    `data_needs` ask for a tokenizer view (mim)."""
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EmaSection:
    """An exponential moving average of the weights (unilm's and timm's `model_ema`), updated after
    every optimizer step as ema = decay * ema + (1 - decay) * weights, starting from the weights
    the run starts with. It is sharded like the parameters (under ZeRO-3 each rank keeps the
    average of its own partition, in fp32), saved in every checkpoint and resumed with it."""

    enabled: bool = False
    decay: float = 0.9999
    """unilm's default; the average spans about 1 / (1 - decay) steps (0.9999: 10k steps), so short
    runs want a smaller decay (0.99-0.999)."""
    evaluate: bool = True
    """At every evaluation, evaluate the averaged weights too: their metrics are `val_ema_*`."""
    final: Literal["ema", "raw"] = "ema"
    """Which weights `<run_dir>/final` holds (its beitdist_config.json says which: "weights")."""

    def __post_init__(self) -> None:
        check(0.0 <= self.decay < 1.0, "decay", f"expected 0 <= decay < 1, got {self.decay}")


@dataclass(frozen=True)
class RepresentationSection:
    """Representation checks during training (`beitdist.representation`): k-NN top-1 and a linear
    probe on the backbone's frozen features of the dataset's labelled splits, logged with the
    evaluation metrics as `val_knn_top1` / `val_linear_probe_top1` (MLflow, eval history, Ray)."""

    every: int = 0
    """At every evaluation whose step is a multiple of this (0: off)."""
    knn: bool = True
    linear_probe: bool = True
    max_train_images: int = 10000
    """The k-NN bank and the probe's training set: at most this many train images."""

    def __post_init__(self) -> None:
        check(self.every >= 0, "every", f"expected >= 0, got {self.every}")
        check(self.max_train_images >= 1, "max_train_images", f"expected >= 1, got {self.max_train_images}")
        check(self.every == 0 or self.knn or self.linear_probe, "knn",
              "with every > 0, at least one of knn and linear_probe must be on")


@dataclass(frozen=True)
class TrainSection:
    steps: int = 100
    """Optimizer steps in the whole run."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end)."""
    checkpoint_every: int = 0
    """Save a checkpoint every N steps (0: only at the end)."""
    keep_checkpoints: int = 2
    log_every: int = 10
    max_nonfinite_steps: int = 3
    """Stop after this many consecutive non-finite losses (steps with NaN/inf are skipped)."""
    eval_mode: str = "whole"
    """'whole' images, 'slide' (sliding window) or 'ms-flip' (sliding windows at scales 0.5-1.75 and
    mirrored, mmseg's aug_test), for heads whose `evaluate_batch` has them (segmentation); the
    others evaluate whole images either way."""
    stop_at: int = 0
    """Stop after this step with a checkpoint, as a preempted job would (0: run to the end); the
    next launch of the same run resumes from it. For time-boxed jobs and resume tests."""
    ema: EmaSection = field(default_factory=EmaSection)
    representation: RepresentationSection = field(default_factory=RepresentationSection)

    def __post_init__(self) -> None:
        check(self.steps > 0, "steps", f"expected > 0, got {self.steps}")
        for name in ("eval_every", "checkpoint_every", "log_every"):
            check(getattr(self, name) >= 0, name, f"expected >= 0, got {getattr(self, name)}")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", f"expected >= 1, got {self.keep_checkpoints}")
        check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", f"expected >= 1, got {self.max_nonfinite_steps}")
        check(self.eval_mode in EVAL_MODES, "eval_mode", f"got {self.eval_mode!r}; allowed: {', '.join(EVAL_MODES)}")
        check(0 <= self.stop_at <= self.steps, "stop_at", f"expected 0 <= stop_at <= steps, got {self.stop_at}")


EVAL_MODES = ("whole", "slide", "ms-flip")

PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]


@dataclass(frozen=True)
class ScalingSection:
    """How many workers Ray Train starts and where (Ray's ScalingConfig and FailureConfig)."""

    num_workers: int = 1
    """Ranks (one process each; one GPU each when use_gpu). The global batch is
    data.batch_size x engine.grad_accum x num_workers."""
    use_gpu: bool | Literal["auto"] = "auto"
    """"auto": GPUs when the Ray cluster has any (`--address`), else when the launching machine sees CUDA."""
    resources_per_worker: dict[str, float] = field(default_factory=dict)
    """Ray resources per worker, e.g. {CPU: 8, GPU: 1}; empty: 1 CPU. A worker that trains on GPUs
    always asks for one GPU (GPU: 1 is added when missing)."""
    placement_strategy: PlacementStrategy = "PACK"
    max_failures: int = 0
    """Worker-group restarts Ray Train attempts (each resumes from the newest checkpoint); -1: unlimited."""
    gpu_memory_gb: float | None = None
    """Device memory per GPU, for planning (`beitdist plan`, `launch --dry-run`); None: not checked."""
    global_batch_size: int | None = None
    """Samples per optimizer step, pinned: engine.grad_accum is then derived at run time as
    global_batch_size / (data.batch_size x ranks), so a run resumed on fewer or more workers
    (elastic) keeps its optimization. None: data.batch_size x engine.grad_accum x num_workers."""

    def __post_init__(self) -> None:
        check(self.num_workers >= 1, "num_workers", f"expected >= 1, got {self.num_workers}")
        check(self.max_failures >= -1, "max_failures", f"expected >= 0 (or -1: unlimited), got {self.max_failures}")
        for name, amount in self.resources_per_worker.items():
            check(bool(name), "resources_per_worker", "resource names must not be empty")
            check(math.isfinite(amount) and amount >= 0, f"resources_per_worker.{name}",
                  f"expected a finite amount >= 0, got {amount}")
        gpus = self.resources_per_worker.get("GPU", 0)
        if self.use_gpu is False:
            check(gpus == 0, "resources_per_worker.GPU", "asks for GPUs, but use_gpu is false")
        if self.use_gpu is True:
            check(self.resources_per_worker.get("GPU", 1) == 1, "resources_per_worker.GPU",
                  "is 0, but use_gpu is true: set GPU: 1 (or leave it out), or use_gpu: false")
        check(gpus in (0, 1), "resources_per_worker.GPU",
              f"expected 1 (or 0 on CPUs), got {gpus}: each rank drives exactly one GPU (ranks sharing one fail "
              "in NCCL; a rank given two would use one); for more GPUs raise num_workers")
        check(self.global_batch_size is None or self.global_batch_size >= 1, "global_batch_size",
              f"expected >= 1 or null, got {self.global_batch_size}")
        check(self.gpu_memory_gb is None or (math.isfinite(self.gpu_memory_gb) and self.gpu_memory_gb > 0),
              "gpu_memory_gb", f"expected a size in GB > 0 or null, got {self.gpu_memory_gb}")


TRACKING_SCHEMES = ("file", "sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks", "databricks-uc")
"""MLflow tracking URI schemes (a database scheme may carry a driver: postgresql+psycopg2)."""


def _uri_scheme(uri: str) -> str:
    """The scheme of a URI, "" for a plain (or Windows drive-letter) path."""
    head, sep, _ = uri.strip().partition(":")
    if not sep or len(head) == 1 or not head.replace("+", "").replace("-", "").replace(".", "").isalnum():
        return ""
    return head.lower().split("+")[0]


@dataclass(frozen=True)
class TrackingSection:
    """MLflow: what rank 0 logs, and where."""

    enabled: bool = True
    uri: str | None = None
    """Tracking URI (file path, sqlite:///..., http://server:5000). None: MLFLOW_TRACKING_URI when
    set (read by the CLI / launcher entry point, never here), else a sqlite file in the run dir."""
    experiment: str = "beitdist"
    log_images: bool = True
    """Log a few input images (and segmentation predictions) as artifacts."""
    parent_run_id: str | None = None
    """An MLflow run this run is nested under (set by `beitdist tune` for its trials)."""

    def __post_init__(self) -> None:
        check(self.uri is None or bool(self.uri.strip()), "uri", "expected a tracking URI or null")
        scheme = _uri_scheme(self.uri) if self.uri else ""
        check(scheme in ("",) + TRACKING_SCHEMES, "uri",
              f"unknown scheme {scheme!r} in {self.uri!r}; allowed: a file path, or "
              + ", ".join(f"{s}:" for s in TRACKING_SCHEMES))
        check(bool(self.experiment.strip()), "experiment", "expected a non-empty experiment name")


@dataclass(frozen=True)
class StorageSection:
    """Where a run with an object-store `output_dir` (`s3://bucket/prefix`) is staged and how the
    store is reached (`beitdist.run.storage`)."""

    options: dict[str, Any] = field(default_factory=dict)
    """fsspec's keyword arguments for the store; S3-compatible stores: endpoint_url, key, secret,
    client_kwargs: {region_name: ...}. Empty: s3fs reads the AWS_* environment variables."""
    cache_dir: str | None = None
    """Each node's local staging copy of the run (default ~/.cache/beitdist/runs); a cache: the
    store holds the run."""


@dataclass(frozen=True)
class Recipe:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    """Runs are written to <output_dir>/<name>/ (checkpoints, final weights, MLflow store); an
    object-store URL (s3://bucket/prefix) keeps the run there, staged on each node (`storage`)."""
    model: ModelSection = field(default_factory=ModelSection)
    head: HeadSection = field(default_factory=HeadSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="digits"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainSection = field(default_factory=TrainSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    tracking: TrackingSection = field(default_factory=TrackingSection)
    storage: StorageSection = field(default_factory=StorageSection)

    def __post_init__(self) -> None:
        check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."), "name",
              f"expected a run name without '/', got {self.name!r}")
        try:
            self.model.backbone_config()  # surfaces backbone errors at load time
        except OptionsError as err:
            raise OptionsError(f"model.{err.path}", str(err).removeprefix(f"{err.path}: ")) from None
        check(self.tokenizer.name is not None or not self.tokenizer.options, "tokenizer.options",
              "given, but tokenizer.name is not set")
        self._check_consistency()

    def check_plugins(self) -> None:
        """The plugins this recipe names are installed and accept their options (the head's,
        tokenizer's and dataset's own schemas), and the head gets the tokenizer it needs. Kept out
        of parsing so a Recipe can be built and inspected anywhere (a test, a driver without the
        plugin packages); `load_recipe` and every worker run it."""
        head = _plugin("head", self.head.name, "head.name")
        self.head_options()
        if head.data_needs.tokenizer:
            check(self.tokenizer.name is not None, "tokenizer.name",
                  f"the {self.head.name} head needs a tokenizer for its targets (dalle, codebook, ...)")
        if self.tokenizer.name is not None:
            _plugin("tokenizer", self.tokenizer.name, "tokenizer.name")
            self.tokenizer_options()
        _plugin("dataset", self.data.dataset, "data.dataset")
        self.dataset_options()

    def _check_consistency(self) -> None:
        """Engine, data and scaling settings that are each valid but cannot run together."""
        scaling, engine = self.scaling, self.engine
        if scaling.use_gpu is False:
            check(engine.precision != "fp16", "engine.precision",
                  "fp16 needs GPUs (loss scaling on CUDA), but scaling.use_gpu is false; use bf16 or fp32")
            check(not (engine.backend == "fairscale" and engine.fairscale_mode == "fsdp"), "engine.fairscale_mode",
                  "fsdp needs GPUs (fairscale's FullyShardedDataParallel is GPU-only), but scaling.use_gpu is false; "
                  "use engine.fairscale_mode: oss or engine.backend: deepspeed")
        check(not (self.train.ema.enabled and engine.backend == "fairscale" and engine.fairscale_mode == "fsdp"),
              "train.ema.enabled", "model EMA is not available with engine.fairscale_mode: fsdp (it shards parameters its "
              "own way); use engine.fairscale_mode: oss, or engine.backend: deepspeed (any ZeRO stage)")
        if scaling.global_batch_size is not None:
            self._check_global_batch(scaling.num_workers, "scaling.num_workers")
            derived = scaling.global_batch_size // (self.data.batch_size * scaling.num_workers)
            check(engine.grad_accum in (1, derived), "engine.grad_accum",
                  f"is {engine.grad_accum}, but scaling.global_batch_size {scaling.global_batch_size} / "
                  f"(data.batch_size {self.data.batch_size} x scaling.num_workers {scaling.num_workers}) gives "
                  f"{derived}; remove engine.grad_accum (it is derived) or scaling.global_batch_size")
        accum = engine.grad_accum
        if scaling.global_batch_size is not None:  # derived, as at_world_size does at run time
            accum = scaling.global_batch_size // (self.data.batch_size * scaling.num_workers)
        implied = {
            "train_batch_size": (self.global_batch, "data.batch_size x engine.grad_accum x scaling.num_workers"),
            "train_micro_batch_size_per_gpu": (self.data.batch_size, "data.batch_size"),
            "gradient_accumulation_steps": (accum, "engine.grad_accum"),
        }
        for key, (value, source) in implied.items():
            if key in engine.raw:
                check(engine.raw[key] == value, f"engine.raw.{key}",
                      f"is {engine.raw[key]!r}, but the recipe implies {value} ({source}); "
                      f"remove it from engine.raw and set {source.split(' x ')[0]} instead")

    def head_options(self) -> Any:
        return _plugin("head", self.head.name, "head.name").parse_options(self.head.options, "head.options")

    def tokenizer_options(self) -> Any:
        """The tokenizer's parsed Options (None without a tokenizer)."""
        if self.tokenizer.name is None:
            return None
        cls = _plugin("tokenizer", self.tokenizer.name, "tokenizer.name")
        return parse(cls.Options, self.tokenizer.options, "tokenizer.options")

    def dataset_options(self) -> Any:
        cls = _plugin("dataset", self.data.dataset, "data.dataset")
        return parse(cls.Options, self.data.options, "data.options")

    def _check_global_batch(self, ranks: int, source: str) -> None:
        per_step = self.data.batch_size * ranks
        gbs = self.scaling.global_batch_size
        check(gbs is not None and gbs % per_step == 0, "scaling.global_batch_size",
              f"{gbs} is not a multiple of data.batch_size {self.data.batch_size} x {ranks} ranks ({source}); "
              f"allowed: multiples of {per_step}, or change data.batch_size")

    def at_world_size(self, ranks: int) -> Recipe:
        """This recipe as run on `ranks` ranks: with a pinned scaling.global_batch_size,
        engine.grad_accum becomes global / (data.batch_size x ranks); otherwise unchanged."""
        gbs = self.scaling.global_batch_size
        if gbs is None:
            return self
        try:
            self._check_global_batch(ranks, f"the run has {ranks} ranks")
        except OptionsError as err:
            raise RecipeError(f"recipe {self.name!r}: {err}") from None
        accum = gbs // (self.data.batch_size * ranks)
        return self.replace(engine=dataclasses.replace(self.engine, grad_accum=accum),
                            scaling=dataclasses.replace(self.scaling, num_workers=ranks))

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: data.batch_size x engine.grad_accum x scaling.num_workers
        (scaling.global_batch_size when pinned)."""
        if self.scaling.global_batch_size is not None:
            return self.scaling.global_batch_size
        return self.data.batch_size * self.engine.grad_accum * self.scaling.num_workers

    @property
    def run_dir(self) -> Path:
        """Where this process writes the run: <output_dir>/<name>, or its local staging copy when
        output_dir is an object store (`run_url`)."""
        if self.run_url is not None:
            from beitdist.run.storage import staging_dir

            return staging_dir(self.output_dir, self.name, self.storage.cache_dir)
        return Path(self.output_dir) / self.name

    @property
    def run_url(self) -> str | None:
        """<output_dir>/<name> when output_dir is an object-store URL (None for a local run)."""
        from beitdist.data.remote import is_remote

        return f"{self.output_dir.rstrip('/')}/{self.name}" if is_remote(self.output_dir) else None

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_record(self) -> dict[str, Any]:
        """`to_dict` as checkpoints and MLflow record it: credentials redacted
        (`beitdist.credentials`); the workers are sent `to_dict`."""
        from beitdist.credentials import redacted

        return redacted(to_dict(self))

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)


def with_environment(recipe: Recipe, environ: Mapping[str, str] | None = None) -> Recipe:
    """The recipe with what the environment says where the recipe is silent: MLFLOW_TRACKING_URI
    becomes `tracking.uri`. Resolved once, where the command starts, so every worker (a Ray
    worker does not inherit the driver's environment) logs to the same place."""
    environ = os.environ if environ is None else environ
    uri = environ.get("MLFLOW_TRACKING_URI")
    if uri and uri.strip() and recipe.tracking.uri is None:
        try:
            return recipe.replace(tracking=dataclasses.replace(recipe.tracking, uri=uri.strip()))
        except OptionsError as err:  # checked like tracking.uri, but the user set the variable
            raise RecipeError(f"MLFLOW_TRACKING_URI (the environment, used as tracking.uri): {err}") from None
    return recipe


def _plugin(kind: str, name: str, path: str) -> Any:
    """The registered plugin class, or an OptionsError at `path` listing the available names."""
    from beitdist import plugins

    lookup = {"head": plugins.head_class, "tokenizer": plugins.tokenizer_class, "dataset": plugins.dataset_class}
    try:
        return lookup[kind](name)
    except plugins.UnknownPluginError as err:
        raise OptionsError(path, str(err)) from None


# ------------------------------------------------------------------------------- parsing
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


def _key_path(path: str) -> tuple[str, ...]:
    return tuple(m.group(1) for m in _PATH_PART.finditer(path) if m.group(1) is not None)


def _origin(origins: Origins | None, path: str) -> str | None:
    """The file (or --set) the value at `path` came from: its longest recorded prefix."""
    if not origins:
        return None
    keys = _key_path(path)
    for n in range(len(keys), 0, -1):
        if keys[:n] in origins:
            return origins[keys[:n]]
    return None


def _oversized_number(data: Any, path: str = "") -> str | None:
    """Path of the first integer no float can hold (the schema converts numbers with float())."""
    if isinstance(data, Mapping):
        for key, value in data.items():
            found = _oversized_number(value, f"{path}.{key}" if path else str(key))
            if found is not None:
                return found
    elif isinstance(data, (list, tuple)):
        for i, value in enumerate(data):
            found = _oversized_number(value, f"{path}[{i}]")
            if found is not None:
                return found
    elif isinstance(data, int) and not isinstance(data, bool) and abs(data) > 2**1000:
        return path or "<document>"
    return None


def parse_recipe(data: Mapping[str, Any], where: str = "recipe", origins: Origins | None = None,
                 plugins: bool = True) -> Recipe:
    """A plain mapping (YAML document, or the dict sent to Ray workers) -> Recipe.

    Parsing itself is pure (the schema and the consistency rules, no registry, no disk);
    `plugins=True` then runs `Recipe.check_plugins`, the separate step that asks the installed
    plugins. Raises RecipeError "<where>: <field path>: <problem>", plus "(set in <file>)" when
    `origins` says the value came from another file or a --set override."""
    if not isinstance(data, Mapping):
        raise RecipeError(f"{where}: a recipe must be a mapping, got {type(data).__name__}")
    if INHERIT_KEY in data:
        raise RecipeError(f"{where}: {INHERIT_KEY}: only recipe files can inherit (load_recipe resolves it)")
    oversized = _oversized_number(data)
    if oversized is not None:
        raise RecipeError(f"{where}: {oversized}: number out of range")
    try:
        recipe = parse(Recipe, data)
        if plugins:
            recipe.check_plugins()
        return recipe
    except OptionsError as err:
        origin = _origin(origins, err.path) if err.path else None
        note = f" (set in {origin})" if origin is not None and origin != where else ""
        raise RecipeError(f"{where}: {err}{note}") from None


# ------------------------------------------------------------------------- files and merging
def _record(origins: Origins, value: Any, path: tuple[str, ...], source: str) -> None:
    origins[path] = source
    if isinstance(value, Mapping):
        for key, child in value.items():
            _record(origins, child, path + (str(key),), source)


def _forget(origins: Origins, path: tuple[str, ...]) -> None:
    for key in [k for k in origins if k[: len(path)] == path]:
        del origins[key]


def merge_recipes(base: Mapping[str, Any], child: Mapping[str, Any], origins: Origins | None = None,
                  source: str = "<child>", _path: tuple[str, ...] = ()) -> dict[str, Any]:
    """Deep merge: the child wins; mappings merge key by key; lists and scalars are replaced whole.
    In head / tokenizer / data, a child naming a different plugin drops the base's `options`.
    `origins` (updated in place) records which source each value came from."""
    origins = {} if origins is None else origins
    out = copy.deepcopy(dict(base))
    for key, value in child.items():
        path = _path + (str(key),)
        current = out.get(key)
        if isinstance(value, Mapping) and isinstance(current, Mapping):
            current = dict(current)
            name_key = PLUGIN_SECTIONS.get(str(key)) if not _path else None
            if name_key is not None and name_key in value and value[name_key] != current.get(name_key):
                current.pop("options", None)
                _forget(origins, path + ("options",))
            out[key] = merge_recipes(current, value, origins, source, path)
        else:
            _forget(origins, path)
            out[key] = copy.deepcopy(value)
            _record(origins, value, path, source)
    return out


def _yaml_error(path: Path, err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    problem = getattr(err, "problem", None) or str(err)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    context = getattr(err, "context", None)
    return " ".join(f"{where}: not valid YAML: {problem}{f' ({context})' if context else ''}".split())


def read_recipe_data(path: str | Path) -> dict[str, Any]:
    """One YAML file as a mapping (no inheritance resolved)."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise RecipeError(_yaml_error(path, err)) from None
    except (OSError, UnicodeDecodeError) as err:
        raise RecipeError(f"{path}: cannot read the recipe: {err}") from None
    if data is None:
        raise RecipeError(f"{path}: the recipe file is empty")
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return dict(data)


def resolve_recipe_file(path: str | Path, _chain: tuple[Path, ...] = ()) -> tuple[dict[str, Any], Origins]:
    """Read a recipe file and everything it inherits: (merged document, origins)."""
    path = Path(path)
    data = read_recipe_data(path)
    parent = data.pop(INHERIT_KEY, None)
    origins: Origins = {}
    if parent is None:
        _record(origins, data, (), str(path))
        del origins[()]
        return data, origins
    if not isinstance(parent, str) or not parent.strip():
        raise RecipeError(f"{path}: {INHERIT_KEY}: expected the path of a base recipe (relative to this file), "
                          f"got {parent!r}")
    base_path = path.parent / parent
    chain = _chain + (path.resolve(),)
    if base_path.resolve() in chain:
        names = [str(p) for p in _chain] + [str(path), str(base_path)]
        raise RecipeError(f"{path}: {INHERIT_KEY}: cycle {' -> '.join(names)}")
    if not base_path.is_file():
        raise RecipeError(f"{path}: {INHERIT_KEY}: base recipe {parent!r} not found (looked for {base_path})")
    try:
        base, origins = resolve_recipe_file(base_path, chain)
    except RecipeError as err:
        if str(err).startswith(f"{path}: {INHERIT_KEY}: cycle"):
            raise
        raise RecipeError(f"{path}: {INHERIT_KEY} {parent!r}: {err}") from None
    return merge_recipes(base, data, origins, str(path)), origins


def apply_overrides(data: Mapping[str, Any], overrides: list[str], where: str = "--set",
                    origins: Origins | None = None) -> dict[str, Any]:
    """`a.b=c` strings (c read as YAML: numbers, booleans, lists) applied to a recipe mapping.
    `origins`, when given, records each overridden path as coming from `--set a.b=c`."""
    out = copy.deepcopy(dict(data))
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"{where} {item!r}: expected KEY.PATH=VALUE, e.g. optim.lr=1e-3")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise RecipeError(f"{where} {item!r}: empty key in {path!r}")
        if keys[0] == INHERIT_KEY:
            raise RecipeError(f"{where} {item!r}: {INHERIT_KEY} cannot be overridden (it is resolved first)")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise RecipeError(f"{where} {item!r}: the value is not valid YAML ({' '.join(str(err).split())})") from None
        node = out
        for depth, key in enumerate(keys[:-1]):
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"{where} {item!r}: {'.'.join(keys[: depth + 1])} is not a section "
                                  f"(it holds {child!r})")
            node = child
        node[keys[-1]] = value
        if origins is not None:
            _forget(origins, tuple(keys))
            _record(origins, value, tuple(keys), f"{where} {item}")
    return out


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, resolve `inherit:`, apply `--set` overrides, validate."""
    data, origins = resolve_recipe_file(path)
    try:
        data = apply_overrides(data, overrides or [], origins=origins)
    except RecipeError as err:
        raise RecipeError(f"{path}: {err}") from None
    return parse_recipe(data, str(path), origins)


__all__ = [
    "HeadSection", "ModelSection", "Recipe", "RecipeError", "ScalingSection", "TokenizerSection", "TrackingSection",
    "TrainSection", "apply_overrides", "load_recipe", "merge_recipes", "parse_recipe", "read_recipe_data",
    "resolve_recipe_file",
]
