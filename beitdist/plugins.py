"""The plugin manager: built-ins, setuptools entry points, validating registries.

`get_plugin_manager()` registers the built-in plugins (listed in `BUILTIN_PLUGINS`, also declared
as entry points in setup.cfg like any third-party package), loads the entry points of the group
`beitdist` unless BEITDIST_DISABLE_PLUGIN_AUTOLOAD=1, and calls `check_pending()` so that a
misspelt hook fails loudly. `get_registries()` runs the registration hooks plugin by plugin, so
every entry knows the plugin and package it came from.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pluggy

from beitdist import hookspecs

DISABLE_AUTOLOAD_ENV = "BEITDIST_DISABLE_PLUGIN_AUTOLOAD"
BUILTIN_PACKAGE = "beitdist (built-in)"
BUILTIN_PLUGINS = (
    "beitdist.heads.classification",
    "beitdist.heads.mim",
    "beitdist.heads.segmentation",
    "beitdist.tokenizers.dalle",
    "beitdist.tokenizers.codebook",
    "beitdist.data.datasets",
    "beitdist.data.tar_shards",
    "beitdist.tracking",
)


class PluginError(ValueError):
    """A plugin broke the contract (duplicate name, missing attribute, bad hook); names the plugin."""


class UnknownPluginError(ValueError):
    """A name that no installed plugin provides; the message lists the available ones."""


@dataclass(frozen=True)
class Entry:
    name: str
    obj: Any
    plugin: str
    package: str


class Registry:
    """Entries of one kind (heads, tokenizers, datasets), each validated when added."""

    def __init__(self, kind: str, problems: Callable[[Any], list[str]]) -> None:
        self.kind = kind
        self._problems = problems
        self._entries: dict[str, Entry] = {}
        self._source = ("<direct>", "<unknown>")

    def add(self, obj: Any) -> None:
        plugin, package = self._source
        problems = self._problems(obj)
        if problems:
            raise PluginError(
                f"plugin {plugin!r} (package {package}) registered an invalid {self.kind} {obj!r}: "
                + "; ".join(problems)
            )
        name = obj.name
        if name in self._entries:
            first = self._entries[name]
            raise PluginError(
                f"plugin {plugin!r} (package {package}) registered the {self.kind} name {name!r}, "
                f"already taken by plugin {first.plugin!r} (package {first.package})"
            )
        self._entries[name] = Entry(name, obj, plugin, package)

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
    """Run the registration hooks one plugin at a time and collect the callback plugins."""
    registries = Registries(
        heads=Registry("head", _head_problems),
        tokenizers=Registry("tokenizer", _tokenizer_problems),
        datasets=Registry("dataset", _dataset_problems),
    )
    packages = _packages(pm)
    targets = {
        "beitdist_register_heads": registries.heads,
        "beitdist_register_tokenizers": registries.tokenizers,
        "beitdist_register_datasets": registries.datasets,
    }
    for hook_name, registry in targets.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            registry._source = (impl.plugin_name, packages.get(id(impl.plugin), BUILTIN_PACKAGE))
            impl.function(registry=registry)
        registry._source = ("<direct>", "<unknown>")
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
        registered = pm.register(plugin, name=name)
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
