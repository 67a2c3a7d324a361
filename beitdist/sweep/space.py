"""The search space: distributions over recipe keys, sampled into concrete trials before the sweep.

Sampling up front (seeded by the recipe's seed) rather than inside Ray Tune means every trial's
recipe is parsed, with its plugins' option schemas, before anything starts: a value the recipe
refuses is one line at the command, not a failed trial an hour in. It also makes `--dry-run` show
the very trials the sweep will run, and a restored sweep run the same ones.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from beitdist.errors import InputError
from beitdist.recipe import INHERIT_KEY, Recipe, apply_overrides, parse_recipe
from beitdist.sweep.spec import SweepError

DISTRIBUTIONS = ("uniform", "loguniform", "randint", "choice", "grid")
"""uniform/loguniform [low, high] (floats), randint [low, high) (integers), choice [values]
(sampled), grid [values] (every one, times `trials`)."""

MAX_TRIALS = 10_000


@dataclass(frozen=True)
class Distribution:
    key: str
    kind: str
    args: tuple[Any, ...]

    def describe(self) -> str:
        return f"{self.kind} {list(self.args)}"

    def sample(self, rng: np.random.Generator) -> Any:
        if self.kind == "uniform":
            return float(rng.uniform(self.args[0], self.args[1]))
        if self.kind == "loguniform":
            return float(math.exp(rng.uniform(math.log(self.args[0]), math.log(self.args[1]))))
        if self.kind == "randint":
            return int(rng.integers(self.args[0], self.args[1]))
        if self.kind == "choice":
            return self.args[int(rng.integers(len(self.args)))]
        raise ValueError(f"{self.kind} is not sampled")

    def probes(self) -> list[Any]:
        """Values that stand for the whole range when checking it against the recipe: both ends
        (and the middle) of an interval, every listed value."""
        if self.kind == "uniform":
            low, high = self.args
            return [float(low), float(low + high) / 2, float(high)]
        if self.kind == "loguniform":
            low, high = self.args
            return [float(low), float(math.sqrt(low * high)), float(high)]
        if self.kind == "randint":
            return sorted({int(self.args[0]), int(self.args[1]) - 1})
        return list(self.args)


@dataclass(frozen=True)
class Trial:
    index: int
    values: dict[str, Any]
    """Recipe key -> this trial's value."""

    @property
    def name(self) -> str:
        return f"trial_{self.index:03d}"

    def describe(self) -> str:
        return ", ".join(f"{k}={_short(v)}" for k, v in self.values.items())


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


def _yaml12_number(value: Any) -> Any:
    """`1e-3` as the number it is: PyYAML (YAML 1.1) reads exponents without a dot as strings."""
    return float(value) if isinstance(value, str) and _FLOAT.fullmatch(value.strip()) else value


def parse_distribution(key: str, spec: Any, where: str) -> Distribution:
    """One `key: {kind: args}` entry; SweepError naming the key and what is allowed."""
    at = f"{where}: search.{key}"
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
        raise SweepError(f"{where}: search: {key!r} is not a recipe key (dotted, as for --set: optim.lr)")
    if key.split(".")[0] in (INHERIT_KEY, "name", "output_dir"):
        raise SweepError(f"{at}: cannot be searched (each trial's name and directory belong to the sweep)")
    if not (isinstance(spec, Mapping) and len(spec) == 1):
        raise SweepError(f"{at}: expected one distribution, e.g. {{loguniform: [1.0e-4, 1.0e-2]}}; "
                         f"allowed: {', '.join(DISTRIBUTIONS)}")
    (kind, args), = spec.items()
    if kind not in DISTRIBUTIONS:
        raise SweepError(f"{at}: unknown distribution {kind!r}; allowed: {', '.join(DISTRIBUTIONS)}")
    if not isinstance(args, Sequence) or isinstance(args, str) or not args:
        raise SweepError(f"{at}: {kind} expects a non-empty list, got {args!r}")
    args = tuple(_yaml12_number(a) for a in args)
    if kind in ("uniform", "loguniform", "randint"):
        if len(args) != 2 or not all(_number(a) for a in args):
            raise SweepError(f"{at}: {kind} expects [low, high] (two numbers), got {list(args)}")
        low, high = args
        if kind == "randint" and not all(isinstance(a, int) for a in args):
            raise SweepError(f"{at}: randint expects integers [low, high), got {list(args)}")
        if not low < high:
            raise SweepError(f"{at}: {kind} {list(args)} holds no value: expected low < high")
        if kind == "loguniform" and low <= 0:
            raise SweepError(f"{at}: loguniform {list(args)} needs low > 0 (use uniform for ranges from 0)")
    return Distribution(key, kind, args)


def parse_space(search: Mapping[str, Any], where: str) -> list[Distribution]:
    return [parse_distribution(key, spec, where) for key, spec in search.items()]


def sample_trials(space: list[Distribution], trials: int, seed: int) -> list[Trial]:
    """`trials` samples of the sampled distributions for every point of the grid ones (their
    product), in grid order; the same seed gives the same trials."""
    grids = [d for d in space if d.kind == "grid"]
    sampled = [d for d in space if d.kind != "grid"]
    points = list(itertools.product(*(d.args for d in grids))) or [()]
    if len(points) * trials > MAX_TRIALS:
        raise SweepError(f"search: {len(points)} grid points x {trials} trials is more than {MAX_TRIALS} trials")
    rng = np.random.default_rng(seed)
    out: list[Trial] = []
    for point in points:
        for _ in range(trials):
            values = dict(zip((d.key for d in grids), point, strict=True))
            values.update({d.key: d.sample(rng) for d in sampled})
            out.append(Trial(len(out), {d.key: values[d.key] for d in space}))
    return out


def with_values(data: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """The recipe mapping with the trial's values set (like --set, without reading them as YAML)."""
    out = apply_overrides(data, [f"{key}=null" for key in values])
    for key, value in values.items():
        node = out
        *parents, last = key.split(".")
        for part in parents:
            node = node[part]
        node[last] = value
    return out


def trial_recipe(data: Mapping[str, Any], values: Mapping[str, Any], where: str) -> Recipe:
    """The recipe of one trial, parsed with its plugins' options (RecipeError on a refused value)."""
    return parse_recipe(with_values(data, values), where=where)


def check_space(data: Mapping[str, Any], space: list[Distribution], trials: list[Trial], where: str) -> None:
    """Refuse, in one line, a key the recipe does not have, a distribution whose values its field
    refuses (type or range), a space where no value is valid, and any sampled trial the recipe
    refuses (two keys can be valid alone and not together)."""
    for dist in space:
        probes = dist.probes()
        refused = []
        for value in probes:
            try:
                trial_recipe(data, {dist.key: value}, where)
            except InputError as err:
                refused.append((value, _after_where(str(err), where)))
        if refused and len(refused) == len(probes):
            value, reason = refused[0]
            if "unknown" in reason and any(reason.startswith(".".join(dist.key.split(".")[:n]) + ":")
                                           for n in range(1, dist.key.count(".") + 2)):
                raise SweepError(f"search.{dist.key}: not a recipe key ({reason})")
            raise SweepError(f"search.{dist.key}: {dist.describe()} has no value the recipe accepts "
                             f"({_short(value)}: {reason})")
        if refused:
            value, reason = refused[0]
            raise SweepError(f"search.{dist.key}: {dist.describe()} includes {_short(value)}, which the recipe "
                             f"refuses ({reason}); every value in the range must be valid")
    for trial in trials:
        try:
            trial_recipe(data, trial.values, where)
        except InputError as err:
            raise SweepError(f"search: {trial.name} ({trial.describe()}) is refused by the recipe: "
                             f"{_after_where(str(err), where)}") from None


def _after_where(message: str, where: str) -> str:
    return message.removeprefix(f"{where}: ")
