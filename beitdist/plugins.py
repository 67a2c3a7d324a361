"""The plugin manager: built-ins, setuptools entry points, validating registries.

`get_plugin_manager()` registers the built-in plugins (listed in `BUILTIN_PLUGINS`, also declared
as entry points in setup.cfg like any third-party package), loads the entry points of the group
`beitdist` unless BEITDIST_DISABLE_PLUGIN_AUTOLOAD=1, and calls `check_pending()` so that a
misspelt hook fails loudly. `get_registries()` calls each registration hook once through pluggy
(so hookwrappers, `tryfirst`/`trylast` and impls taking fewer arguments behave as pluggy
documents), and every entry knows the plugin and package whose hook added it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import CodeType
from typing import Any, cast

import pluggy

from beitdist import hookspecs
from beitdist.errors import InputError

DISABLE_AUTOLOAD_ENV = "BEITDIST_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_PACKAGE = "beitdist (built-in)"
BUILTIN_PLUGINS = (
    "beitdist.heads.classification",
    "beitdist.heads.mim",
    "beitdist.heads.mim_v2",
    "beitdist.heads.vqkd",
    "beitdist.heads.segmentation",
    "beitdist.tokenizers.dalle",
    "beitdist.tokenizers.codebook",
    "beitdist.tokenizers.vqkd",
    "beitdist.data.datasets",
    "beitdist.data.tar_shards",
    "beitdist.tracking",
)


class PluginError(InputError):
    """A plugin broke the contract (duplicate name, missing attribute, bad hook); names the plugin."""


class UnknownPluginError(InputError):
    """A name that no installed plugin provides; the message lists the available ones."""


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    plugin: str
    package: str


DIRECT = ("<direct>", "<unknown>", -1)
"""Provenance of an entry added outside any registration hook: (plugin, package, registration rank)."""


def _code_of(function: Any) -> CodeType | None:
    return getattr(getattr(function, "__func__", function), "__code__", None)


class Registry:
    """Entries of one kind (heads, tokenizers, datasets), each validated when added.

    `add` attributes an entry to the hook implementation it is called from (directly or through
    helpers): it looks up the call stack for the code of one of the `owners` that
    `collect_registries` passes, so one call of the hook through pluggy registers every plugin's
    entries with their own plugin and package names. pluggy calls the plugin registered last
    first; a name taken twice is blamed on the plugin registered later (the rank in `owners`),
    so a third-party package reusing a built-in name is the one named as the culprit."""

    def __init__(self, kind: str, problems: Callable[[Any], list[str]],
                 owners: Mapping[CodeType, tuple[str, str, int]] | None = None) -> None:
        self.kind = kind
        self._problems = problems
        self._entries: dict[str, Entry] = {}
        self._ranks: dict[str, int] = {}
        self._owners = dict(owners or {})

    def _caller(self) -> tuple[str, str, int]:
        frame = inspect.currentframe()
        try:
            while frame is not None:
                owner = self._owners.get(frame.f_code)
                if owner is not None:
                    return owner
                frame = frame.f_back
            return DIRECT
        finally:
            del frame

    def add(self, obj: Any) -> None:
        plugin, package, rank = self._caller()
        problems = self._problems(obj)
        if problems:
            raise PluginError(
                f"plugin {plugin!r} (package {package}) registered an invalid {self.kind} {obj!r}: "
                + "; ".join(problems)
            )
        name = obj.name
        if name in self._entries:
            first, second = self._entries[name], Entry(name, obj, plugin, package)
            if 0 <= rank < self._ranks[name]:  # the plugin already holding the name came later
                first, second = second, first
            raise PluginError(
                f"plugin {second.plugin!r} (package {second.package}) registered the {self.kind} name {name!r}, "
                f"already taken by plugin {first.plugin!r} (package {first.package})"
            )
        self._entries[name] = Entry(name, obj, plugin, package)
        self._ranks[name] = rank

    def get(self, name: str) -> Any:
        return self.entry(name).obj

    def entry(self, name: str) -> Entry:
        if name not in self._entries:
            available = sorted(self._entries)
            hint = difflib.get_close_matches(str(name), available, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise UnknownPluginError(
                f"unknown {self.kind} {name!r}{suggestion}; available: {', '.join(available) or 'none'}"
            )
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __contains__(self, name: object) -> bool:
        return name in self._entries


@dataclass
class Registries:
    heads: Registry
    tokenizers: Registry
    datasets: Registry
    callbacks: list[Entry] = dataclasses.field(default_factory=list)
    """Plugins implementing any training-event hook (entry.obj is the plugin object)."""


def _head_problems(obj: Any) -> list[str]:
    from beitdist.heads.base import contract_problems

    return contract_problems(obj)


def _tokenizer_problems(obj: Any) -> list[str]:
    from beitdist.tokenizers.base import contract_problems

    return contract_problems(obj)


def _dataset_problems(obj: Any) -> list[str]:
    from beitdist.data.base import contract_problems

    return contract_problems(obj)


def _disabled(env: dict[str, str] | os._Environ) -> bool:
    return env.get(DISABLE_AUTOLOAD_ENV, "").strip().lower() in ("1", "true", "yes")


def get_plugin_manager(autoload: bool | None = None) -> pluggy.PluginManager:
    """A fresh plugin manager: hookspecs, built-ins, then (unless disabled) entry points."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    for module_name in BUILTIN_PLUGINS:
        pm.register(importlib.import_module(module_name), name=module_name)
    if autoload is None:
        autoload = not _disabled(os.environ)
    if autoload:
        try:
            pm.load_setuptools_entrypoints(hookspecs.PROJECT)
        except Exception as err:  # an entry point that cannot be imported
            raise PluginError(f"a 'beitdist' entry point failed to load: {type(err).__name__}: {err}") from err
    _check_pending(pm)
    return pm


def _check_pending(pm: pluggy.PluginManager) -> None:
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as err:
        name = pm.get_name(err.plugin) or repr(err.plugin)
        raise PluginError(f"plugin {name!r} implements a hook beitdist does not define: {err}") from None


def _packages(pm: pluggy.PluginManager) -> dict[int, str]:
    packages = {}
    for plugin, dist in pm.list_plugin_distinfo():
        packages[id(plugin)] = f"{dist.project_name} {dist.version}"
    return packages


def collect_registries(pm: pluggy.PluginManager) -> Registries:
    """Call each registration hook once through pluggy and collect the callback plugins."""
    packages = _packages(pm)

    def registry(kind: str, hook_name: str, problems: Callable[[Any], list[str]]) -> Registry:
        ranks = {name: rank for rank, (name, _) in enumerate(pm.list_name_plugin())}
        impls = getattr(pm.hook, hook_name).get_hookimpls()
        owners = {_code_of(impl.function): (impl.plugin_name, packages.get(id(impl.plugin), BUILTIN_PACKAGE),
                                            ranks.get(impl.plugin_name, len(ranks))) for impl in impls}
        return Registry(kind, problems, {code: owner for code, owner in owners.items() if code is not None})

    registries = Registries(
        heads=registry("head", "beitdist_register_heads", _head_problems),
        tokenizers=registry("tokenizer", "beitdist_register_tokenizers", _tokenizer_problems),
        datasets=registry("dataset", "beitdist_register_datasets", _dataset_problems),
    )
    pm.hook.beitdist_register_heads(registry=registries.heads)
    pm.hook.beitdist_register_tokenizers(registry=registries.tokenizers)
    pm.hook.beitdist_register_datasets(registry=registries.datasets)
    for name, plugin in pm.list_name_plugin():
        if any(hasattr(plugin, hook) for hook in hookspecs.EVENT_HOOKS):
            registries.callbacks.append(Entry(name, plugin, name, packages.get(id(plugin), BUILTIN_PACKAGE)))
    return registries


class _State:
    """The process-wide plugin manager and the registries collected from it."""

    manager: pluggy.PluginManager | None = None
    registries: Registries | None = None


def get_default_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, built on first use."""
    if _State.manager is None:
        _State.manager = get_plugin_manager()
    return _State.manager


def get_registries() -> Registries:
    """The registries of the process-wide manager (collected again after `register`/`unregister`)."""
    if _State.registries is None:
        _State.registries = collect_registries(get_default_manager())
    return _State.registries


def register(plugin: object, name: str | None = None) -> str:
    """Add a plugin object (a module or any object with hookimpls) to the process-wide manager,
    e.g. for one test; returns its name for `unregister`."""
    pm = get_default_manager()
    try:
        registered = cast(str, pm.register(plugin, name=name))  # None only for a blocked name, never here
    except ValueError as err:  # pluggy: name or object already registered
        raise PluginError(f"cannot register plugin {name or plugin!r}: {err}") from None
    _State.registries = None
    try:
        _check_pending(pm)
        get_registries()
    except Exception:
        pm.unregister(name=registered)
        _State.registries = None
        raise
    return registered


def unregister(name: str) -> None:
    get_default_manager().unregister(name=name)
    _State.registries = None


def reset() -> None:
    """Forget the manager: the next use rebuilds it (after installing a package, or changing
    BEITDIST_DISABLE_PLUGIN_AUTOLOAD)."""
    _State.manager = None
    _State.registries = None


def emit(event: str, **kwargs: Any) -> None:
    """Call a training-event hook (`beitdist_on_step_end`, ...) on every plugin implementing it."""
    if event not in hookspecs.EVENT_HOOKS:
        raise ValueError(f"unknown event {event!r}; allowed: {', '.join(hookspecs.EVENT_HOOKS)}")
    getattr(get_default_manager().hook, event)(**kwargs)


def head_class(name: str) -> Any:
    return get_registries().heads.get(name)


def tokenizer_class(name: str) -> Any:
    return get_registries().tokenizers.get(name)


def dataset_class(name: str) -> Any:
    return get_registries().datasets.get(name)
