"""The recipe: one YAML document describing a whole run, parsed into typed, validated sections.

Errors name the file, the field path, the bad value and what is allowed (with a did-you-mean for
misspelt keys). Only a plain dict crosses process boundaries (Ray); every worker re-parses it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from beitdist.backbone.config import VARIANTS, BackboneConfig, ConfigError, variant
from beitdist.data.pipeline import DataConfig
from beitdist.engine import EngineConfig
from beitdist.optim import OptimConfig
from beitdist.schema import OptionsError, check, parse, to_dict


class RecipeError(ValueError):
    """A recipe that cannot run; the message starts with the file and field path."""


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

    def __post_init__(self) -> None:
        check(self.variant in VARIANTS, "variant", f"got {self.variant!r}; allowed: {', '.join(VARIANTS)}")

    def backbone_config(self) -> BackboneConfig:
        try:
            return variant(self.variant, **self.backbone)
        except (ConfigError, TypeError) as err:
            raise OptionsError("backbone", str(err)) from None


@dataclass(frozen=True)
class HeadSection:
    name: str = "classification"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TokenizerSection:
    name: str | None = None
    """Visual tokenizer for MIM targets (dalle, codebook, or a plugin); required by the mim head."""
    options: dict[str, Any] = field(default_factory=dict)


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
    """Segmentation: 'whole' image or 'slide' (sliding window)."""
    stop_at: int = 0
    """Stop after this step with a checkpoint, as a preempted job would (0: run to the end); the
    next launch of the same run resumes from it. For time-boxed jobs and resume tests."""

    def __post_init__(self) -> None:
        check(self.steps > 0, "steps", f"expected > 0, got {self.steps}")
        for name in ("eval_every", "checkpoint_every", "log_every"):
            check(getattr(self, name) >= 0, name, f"expected >= 0, got {getattr(self, name)}")
        check(self.keep_checkpoints >= 1, "keep_checkpoints", f"expected >= 1, got {self.keep_checkpoints}")
        check(self.max_nonfinite_steps >= 1, "max_nonfinite_steps", f"expected >= 1, got {self.max_nonfinite_steps}")
        check(self.eval_mode in ("whole", "slide"), "eval_mode", f"got {self.eval_mode!r}; allowed: whole, slide")
        check(0 <= self.stop_at <= self.steps, "stop_at", f"expected 0 <= stop_at <= steps, got {self.stop_at}")


@dataclass(frozen=True)
class Recipe:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"
    """Runs are written to <output_dir>/<name>/ (checkpoints, final weights, MLflow store)."""
    model: ModelSection = field(default_factory=ModelSection)
    head: HeadSection = field(default_factory=HeadSection)
    tokenizer: TokenizerSection = field(default_factory=TokenizerSection)
    data: DataConfig = field(default_factory=lambda: DataConfig(dataset="digits"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainSection = field(default_factory=TrainSection)
    scaling: dict[str, Any] = field(default_factory=dict)
    tracking: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.model.backbone_config()  # surfaces backbone errors at load time
        self.head_options()
        if self.head.name == "mim":
            check(self.tokenizer.name is not None, "tokenizer.name", "the mim head needs a tokenizer (dalle, codebook, ...)")

    def head_options(self) -> Any:
        from beitdist.plugins import head_class

        return head_class(self.head.name).parse_options(self.head.options, "head.options")

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def replace(self, **changes: Any) -> Recipe:
        return dataclasses.replace(self, **changes)


def parse_recipe(data: Mapping[str, Any], where: str = "recipe") -> Recipe:
    """A plain mapping (YAML document, or the dict sent to Ray workers) -> Recipe."""
    from beitdist.plugins import UnknownPluginError

    try:
        return parse(Recipe, data)
    except OptionsError as err:
        raise RecipeError(f"{where}: {err}") from None
    except UnknownPluginError as err:
        raise RecipeError(f"{where}: head.name: {err}") from None


def apply_overrides(data: Mapping[str, Any], overrides: list[str], where: str = "--set") -> dict[str, Any]:
    """`a.b=c` strings (c read as YAML: numbers, booleans, lists) applied to a recipe mapping."""
    import copy

    out = copy.deepcopy(dict(data))
    for item in overrides:
        if "=" not in item:
            raise RecipeError(f"{where} {item!r}: expected KEY.PATH=VALUE, e.g. optim.lr=1e-3")
        path, raw = item.split("=", 1)
        keys = path.strip().split(".")
        if not all(keys):
            raise RecipeError(f"{where} {item!r}: empty key in {path!r}")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise RecipeError(f"{where} {item!r}: the value is not valid YAML ({err})") from None
        node = out
        for key in keys[:-1]:
            child = node.get(key)
            if child is None:
                child = node[key] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"{where} {item!r}: {key!r} is not a section")
            node = child
        node[keys[-1]] = value
    return out


def read_recipe_data(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: no such recipe file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(data, Mapping):
        raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(data).__name__}")
    return dict(data)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Read, apply `--set` overrides, validate."""
    data = apply_overrides(read_recipe_data(path), overrides or [])
    return parse_recipe(data, str(path))
