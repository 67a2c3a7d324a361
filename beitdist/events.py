"""What training-event hooks receive: one context object per run, the same on every call."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TrainContext:
    """The run a callback is observing. Callbacks run on every rank; check `is_main` to act once."""

    run_name: str
    run_dir: Path
    rank: int = 0
    world_size: int = 1
    recipe: Any = None
    """The resolved Recipe (typed) of this run."""
    model: Any = None
    """The model being trained (a DeepSpeed engine's module under DeepSpeed)."""
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0
