"""The dataset-plugin contract.

A dataset plugin is a `DatasetPlugin` subclass with class attributes `name` and `Options` (a
dataclass, the schema of the recipe's `data.options`) and a classmethod
`build(options, split, transform) -> torch.utils.data.Dataset` whose items are dicts of tensors
(`pixel_values`, `labels`, ...). `split` is "train" or "val"; `transform` maps a PIL image (and
target) to tensors and is supplied by the training pipeline of the chosen head.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from torch.utils.data import Dataset


class DatasetPlugin:
    name: ClassVar[str]
    Options: ClassVar[type]

    @classmethod
    def build(cls, options: Any, split: str, transform: Callable[..., Any] | None = None) -> Dataset:
        raise NotImplementedError(f"dataset {cls.__name__} must implement build")


def contract_problems(cls: Any) -> list[str]:
    if not (isinstance(cls, type) and issubclass(cls, DatasetPlugin)):
        return [f"{cls!r} is not a subclass of beitdist.data.DatasetPlugin"]
    problems = []
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        problems.append(f"name must be an identifier-like string, got {name!r}")
    if not dataclasses.is_dataclass(getattr(cls, "Options", None)):
        problems.append("Options must be a dataclass")
    if cls.build.__func__ is DatasetPlugin.build.__func__:
        problems.append("build() is not implemented")
    return problems
