"""Typed option schemas: plain mappings (YAML sections) -> frozen dataclasses, or one clear error.

Heads declare their recipe options as a dataclass; recipes are nested dataclasses. `parse` checks
every field against its annotation (int, float, bool, str, Literal, tuples/lists, optional,
nested dataclasses, dicts), rejects unknown keys with a did-you-mean, and reports the full field
path (`head.options.num_classes`) with the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
from collections.abc import Mapping
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

from beitdist.errors import InputError

T = TypeVar("T")


class OptionsError(InputError):
    """A value that does not fit its schema; `path` is the dotted field path."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path


def _join(path: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{path}[{name}]"
    return f"{path}.{name}" if path else name


def _describe(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in get_args(tp))
    if origin in (tuple, list):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        return f"a list of {_describe(args[0])}" if args else "a list"
    if origin in (dict, Mapping):
        return "a mapping"
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return f"a mapping ({tp.__name__})"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, path)
            except OptionsError:
                continue
        raise OptionsError(path, f"got {value!r}; expected {_describe(tp)}")
    if origin is Literal:
        if value in get_args(tp):
            return value
        allowed = [str(a) for a in get_args(tp)]
        hint = difflib.get_close_matches(str(value), allowed, n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise OptionsError(path, f"got {value!r}; allowed: {', '.join(allowed)}{suggestion}")
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise OptionsError(path, f"got {value!r}; expected {_describe(tp)}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise OptionsError(path, f"got {len(value)} values; expected {len(args)}")
            return tuple(_convert(v, a, _join(path, i)) for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_convert(v, item, _join(path, i)) for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise OptionsError(path, f"got {value!r}; expected a mapping")
        key_type, value_type = get_args(tp) or (Any, Any)
        return {
            _convert(k, key_type, path): _convert(v, value_type, _join(path, str(k))) for k, v in value.items()
        }
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return parse(tp, value, path)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads 1e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise OptionsError(path, f"got {value!r} ({type(value).__name__}); expected {_describe(tp)}")


def parse(cls: type[T], data: Any, path: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every field; errors name `path.field`."""
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise OptionsError(path, f"expected a mapping, got {type(data).__name__} {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = str(unknown[0])
        hint = difflib.get_close_matches(key, list(fields), n=1)
        suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise OptionsError(_join(path, key), f"unknown option{suggestion}; allowed: {', '.join(fields)}")
    hints = get_type_hints(cls)
    values = {}
    for name, field in fields.items():
        if name in data:
            values[name] = _convert(data[name], hints[name], _join(path, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise OptionsError(_join(path, name), "required option is missing")
    try:
        return cls(**values)
    except OptionsError as err:
        if path and not err.path.startswith(path):
            raise OptionsError(_join(path, err.path), str(err).split(": ", 1)[-1]) from None
        raise
    except (ValueError, TypeError) as err:
        raise OptionsError(path, str(err)) from None


def to_dict(obj: Any) -> Any:
    """A dataclass tree back to plain YAML/JSON-able values."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, Mapping):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def plugin_class_problems(cls: Any, base: type, public_name: str, methods: tuple[str, ...]) -> list[str]:
    """What a class registered as a plugin of kind `base` lacks (empty when it honours the
    contract): a subclass of `base`, an identifier `name`, a dataclass `Options`, and its own
    implementation of each of `methods`."""
    if not (isinstance(cls, type) and issubclass(cls, base)):
        return [f"{cls!r} is not a subclass of {public_name}"]
    problems = []
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name.isidentifier():
        problems.append(f"name must be an identifier-like string, got {name!r}")
    if not dataclasses.is_dataclass(getattr(cls, "Options", None)):
        problems.append("Options must be a dataclass (the schema of its recipe options)")
    for method in methods:
        mine, theirs = getattr(cls, method), getattr(base, method)
        if getattr(mine, "__func__", mine) is getattr(theirs, "__func__", theirs):
            problems.append(f"{method}() is not implemented")
    return problems


def check(condition: bool, field: str, message: str) -> None:
    """For `__post_init__` range checks: raise OptionsError naming `field` unless `condition`."""
    if not condition:
        raise OptionsError(field, message)


__all__ = ["OptionsError", "check", "parse", "plugin_class_problems", "to_dict"]
