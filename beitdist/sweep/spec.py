"""The sweep file of `beitdist tune RECIPE --search SPEC`.

    search:                          # recipe keys (dotted, as for --set) -> a distribution
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
      optim.layer_decay: {choice: [0.65, 0.75, 0.85]}
    trials: 8                        # samples (times every grid point)
    scheduler: asha                  # or none
    metric: val_loss                 # what the recipe's evaluation reports
    mode: min                        # default: min for *loss, else max
    grace_period: 50                 # steps before ASHA may stop a trial (default: train.eval_every)

A file that holds only the `search` mapping is accepted too. Command-line flags override the file.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import yaml

from beitdist.errors import InputError
from beitdist.schema import OptionsError, check, parse


class SweepError(InputError):
    """A sweep that cannot start: one line naming the file or flag, the key and what is allowed."""


@dataclass(frozen=True)
class SweepSpec:
    search: dict[str, Any] = field(default_factory=dict)
    """Recipe key -> distribution (`beitdist.sweep.space.DISTRIBUTIONS`)."""
    trials: int = 4
    """Random samples of the space; with `grid` distributions, samples per grid point."""
    scheduler: Literal["asha", "none"] = "asha"
    metric: str = "val_loss"
    mode: Literal["min", "max"] | None = None
    grace_period: int | None = None
    """Steps a trial trains before ASHA may stop it (default: the recipe's train.eval_every)."""
    reduction_factor: int = 2
    """ASHA keeps the best 1/reduction_factor of the trials at each rung."""
    max_concurrent: int | None = None
    """At most this many trials at once (default: as many as the cluster fits)."""
    name: str | None = None
    """The sweep's directory under the recipe's output_dir (default: <recipe name>_tune)."""

    def __post_init__(self) -> None:
        check(isinstance(self.search, Mapping) and bool(self.search), "search",
              "expected a mapping of recipe keys to distributions, e.g. optim.lr: {loguniform: [1.0e-4, 1.0e-2]}")
        check(self.trials >= 1, "trials", f"expected >= 1, got {self.trials}")
        check(self.metric.startswith("val_"), "metric",
              f"got {self.metric!r}; a sweep compares trials on a validation metric (val_loss, val_top1, ...)")
        check(self.grace_period is None or self.grace_period >= 1, "grace_period",
              f"expected >= 1 step, got {self.grace_period}")
        check(self.reduction_factor >= 2, "reduction_factor", f"expected >= 2, got {self.reduction_factor}")
        check(self.max_concurrent is None or self.max_concurrent >= 1, "max_concurrent",
              f"expected >= 1, got {self.max_concurrent}")
        check(self.name is None or (bool(self.name.strip()) and "/" not in self.name), "name",
              f"expected a directory name, got {self.name!r}")

    @property
    def resolved_mode(self) -> str:
        return self.mode or ("min" if self.metric.endswith("loss") else "max")

    def better(self, a: float, b: float) -> bool:
        """Whether metric value `a` beats `b` (NaN never does)."""
        if math.isnan(a):
            return False
        return math.isnan(b) or (a < b if self.resolved_mode == "min" else a > b)


_SECTION_KEYS = {f for f in SweepSpec.__dataclass_fields__}


def load_spec(path: str | Path | None, overrides: Mapping[str, Any]) -> SweepSpec:
    """The sweep file (`path`; None: flags only) with the command line's `overrides` (None values
    ignored) applied, validated; SweepError '<file>: <key>: <problem>'."""
    where = str(path) if path is not None else "--search"
    data: dict[str, Any] = {}
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text())
        except OSError as err:
            raise SweepError(f"{where}: cannot read the sweep file ({err.strerror or err})") from None
        except yaml.YAMLError as err:
            raise SweepError(f"{where}: not valid YAML ({' '.join(str(err).split())})") from None
        if not isinstance(raw, Mapping) or not raw:
            raise SweepError(f"{where}: expected a mapping with `search:` (recipe keys -> distributions)")
        data = dict(raw) if "search" in raw else {"search": dict(raw)}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return parse(SweepSpec, data, "")
    except OptionsError as err:
        raise SweepError(f"{where}: {err}") from None


def with_defaults(spec: SweepSpec, recipe_name: str, eval_every: int) -> SweepSpec:
    return replace(spec, name=spec.name or f"{recipe_name}_tune",
                   grace_period=spec.grace_period or eval_every or None)
