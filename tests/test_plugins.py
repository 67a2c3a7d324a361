"""The plugin contract: one test per hookspec (named after it), registry validation, discovery.

Test plugins are registered for one test and unregistered in `finally`, as datasette does.
"""

from __future__ import annotations

import ast
import re
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import beitdist
from beitdist import hookspecs, plugins
from beitdist.backbone import BackboneConfig
from beitdist.data.base import DatasetPlugin
from beitdist.events import TrainContext
from beitdist.schema import OptionsError, check
from beitdist.tokenizers.base import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
TINY = BackboneConfig(embed_dim=32, depth=2, num_heads=4, image_size=32, patch_size=8)


@dataclass(frozen=True)
class TokenCountOptions:
    num_classes: int = 4

    def __post_init__(self) -> None:
        check(self.num_classes > 1, "num_classes", f"expected > 1, got {self.num_classes}")


class TokenCountHead(beitdist.Head):
    """A third-party head reading the token sequence."""

    name = "token_count"
    Options = TokenCountOptions
    needs = "tokens"

    def __init__(self, backbone, options=None):
        super().__init__(backbone, options)
        self.fc = torch.nn.Linear(backbone.embed_dim, self.opts.num_classes)

    def forward(self, features, bool_masked_pos=None):
        return self.fc(features[:, 0])

    def loss(self, output, batch):
        return F.cross_entropy(output.logits, batch["labels"])


@dataclass(frozen=True)
class NoOpts:
    pass


class MeanColourTokenizer(Tokenizer):
    name = "mean_colour"
    Options = NoOpts
    vocab_size = 2
    input_size = 16

    def encode(self, images):
        patches = images.unfold(2, 8, 8).unfold(3, 8, 8).mean(dim=(1, 4, 5))
        return (patches > 0.5).long().flatten(1)


class ConstantDataset(DatasetPlugin):
    name = "constant"
    Options = NoOpts

    @classmethod
    def build(cls, options, split, transform=None):
        return [{"pixel_values": torch.zeros(3, 32, 32), "labels": torch.tensor(0)}]


def _plugin(**hooks) -> types.SimpleNamespace:
    return types.SimpleNamespace(**{name: beitdist.hookimpl(fn) for name, fn in hooks.items()})


@pytest.fixture
def registered():
    names = []

    def add(plugin, name):
        names.append(plugins.register(plugin, name=name))
        return plugin

    yield add
    for name in names:
        plugins.unregister(name)


# ------------------------------------------------------------- one test per hook
def test_beitdist_register_heads(registered):
    registered(_plugin(beitdist_register_heads=lambda registry: registry.add(TokenCountHead)), "tokhead")
    entry = plugins.get_registries().heads.entry("token_count")
    assert entry.obj is TokenCountHead and entry.plugin == "tokhead"
    model = beitdist.build_model(TINY, "token_count", {"num_classes": 3})
    out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 3)
    assert model.loss(out, {"labels": torch.tensor([0, 2])}).ndim == 0


def test_beitdist_register_tokenizers(registered):
    registered(_plugin(beitdist_register_tokenizers=lambda registry: registry.add(MeanColourTokenizer)), "tok")
    tokenizer = plugins.tokenizer_class("mean_colour")({})
    ids = tokenizer.encode(torch.cat([torch.zeros(1, 3, 16, 16), torch.ones(1, 3, 16, 16)]))
    assert ids.tolist() == [[0, 0, 0, 0], [1, 1, 1, 1]]


def test_beitdist_register_datasets(registered):
    registered(_plugin(beitdist_register_datasets=lambda registry: registry.add(ConstantDataset)), "data")
    dataset = plugins.dataset_class("constant").build(NoOpts(), "train")
    assert dataset[0]["labels"].item() == 0


class Recorder:
    def __init__(self):
        self.calls = []

    @beitdist.hookimpl
    def beitdist_on_train_start(self, context):
        self.calls.append(("train_start", context.run_name))

    @beitdist.hookimpl
    def beitdist_on_train_end(self, context, step, metrics, final_dir):
        self.calls.append(("train_end", step, metrics["top1"], final_dir))

    @beitdist.hookimpl
    def beitdist_on_step_end(self, context, step, metrics):
        self.calls.append(("step_end", step, metrics["loss"]))

    @beitdist.hookimpl
    def beitdist_on_eval_end(self, context, step, metrics):
        self.calls.append(("eval_end", step, metrics["top1"]))

    @beitdist.hookimpl
    def beitdist_on_train_failed(self, context, step, error):
        self.calls.append(("train_failed", step, type(error).__name__))

    @beitdist.hookimpl
    def beitdist_on_checkpoint_start(self, context, step):
        self.calls.append(("checkpoint_start", step))

    @beitdist.hookimpl
    def beitdist_on_checkpoint_saved(self, context, step, path):
        self.calls.append(("checkpoint_saved", step, path))


@pytest.fixture
def recorder(registered, tmp_path):
    rec = registered(Recorder(), "recorder")
    assert any(e.name == "recorder" for e in plugins.get_registries().callbacks)
    return rec, TrainContext(run_name="r1", run_dir=tmp_path)


def test_beitdist_on_train_start(recorder):
    rec, context = recorder
    plugins.emit("beitdist_on_train_start", context=context)
    assert rec.calls == [("train_start", "r1")]


def test_beitdist_on_step_end(recorder):
    rec, context = recorder
    plugins.emit("beitdist_on_step_end", context=context, step=3, metrics={"loss": 1.5})
    assert rec.calls == [("step_end", 3, 1.5)]


def test_beitdist_on_eval_end(recorder):
    rec, context = recorder
    plugins.emit("beitdist_on_eval_end", context=context, step=10, metrics={"top1": 0.9})
    assert rec.calls == [("eval_end", 10, 0.9)]


def test_beitdist_on_train_failed(recorder):
    rec, context = recorder
    plugins.emit("beitdist_on_train_failed", context=context, step=7, error=RuntimeError("boom"))
    assert rec.calls == [("train_failed", 7, "RuntimeError")]


def test_beitdist_on_checkpoint_start(recorder):
    rec, context = recorder
    plugins.emit("beitdist_on_checkpoint_start", context=context, step=10)
    assert rec.calls == [("checkpoint_start", 10)]


def test_beitdist_on_checkpoint_saved(recorder):
    rec, context = recorder
    plugins.emit("beitdist_on_checkpoint_saved", context=context, step=10, path="/ckpt/10")
    assert rec.calls == [("checkpoint_saved", 10, "/ckpt/10")]


def test_beitdist_on_train_end(recorder):
    rec, context = recorder
    plugins.emit("beitdist_on_train_end", context=context, step=20, metrics={"top1": 0.9}, final_dir="/run/final")
    assert rec.calls == [("train_end", 20, 0.9, "/run/final")]


# ------------------------------------------------------------------ contract
def test_duplicate_name_names_both_plugins():
    dup = _plugin(beitdist_register_heads=lambda registry: registry.add(TokenCountHead))
    with pytest.raises(plugins.PluginError, match=r"plugin 'dup2' .* 'token_count', already taken by plugin 'dup1'"):
        try:
            plugins.register(dup, name="dup1")
            plugins.register(_plugin(beitdist_register_heads=lambda registry: registry.add(TokenCountHead)), "dup2")
        finally:
            plugins.unregister("dup1")
    assert "dup2" not in dict(plugins.get_default_manager().list_name_plugin())


def test_head_without_contract_is_rejected():
    class Headless(beitdist.Head):
        name = "headless"
        needs = "everything"

    with pytest.raises(plugins.PluginError, match=r"plugin 'bad'.*needs must be one of.*forward\(\) is not implemented"):
        plugins.register(_plugin(beitdist_register_heads=lambda registry: registry.add(Headless)), "bad")
    with pytest.raises(plugins.PluginError, match="is not a subclass of beitdist.heads.Head"):
        plugins.register(_plugin(beitdist_register_heads=lambda registry: registry.add(object)), "bad")


def test_misspelt_hook_fails_loudly():
    with pytest.raises(plugins.PluginError, match="'typo' implements a hook beitdist does not define"):
        plugins.register(_plugin(beitdist_register_head=lambda registry: None), "typo")
    assert "typo" not in dict(plugins.get_default_manager().list_name_plugin())


def test_unknown_head_lists_the_available_ones():
    with pytest.raises(plugins.UnknownPluginError, match=r"unknown head 'clasification' \(did you mean 'classification'\?\); available: .*mim"):
        beitdist.build_model(TINY, "clasification")


def test_bad_head_options_name_the_field():
    with pytest.raises(OptionsError, match=r"head.options.num_clases: unknown option \(did you mean 'num_classes'\?\)"):
        beitdist.build_model(TINY, "classification", {"num_clases": 3})
    with pytest.raises(OptionsError, match=r"head.options.num_classes: expected a positive int, got 0"):
        beitdist.build_model(TINY, "classification", {"num_classes": 0})
    with pytest.raises(OptionsError, match=r"head.options.vocab_size: got 'big' \(str\); expected int"):
        beitdist.build_model(TINY, "mim", {"vocab_size": "big"})


def test_autoload_switch(monkeypatch):
    calls = []
    monkeypatch.setattr("pluggy.PluginManager.load_setuptools_entrypoints", lambda self, group: calls.append(group))
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "1")
    plugins.get_plugin_manager()
    assert calls == []
    monkeypatch.setenv(plugins.DISABLE_AUTOLOAD_ENV, "0")
    plugins.get_plugin_manager()
    assert calls == ["beitdist"]


def test_builtins_are_declared_as_entry_points_like_third_party_ones():
    setup = (ROOT / "setup.cfg").read_text()
    for module in plugins.BUILTIN_PLUGINS:
        assert f"{module} = {module}" in setup


# ------------------------------------------------- a package found by entry point only
THIRD_PARTY_MODULE = '''
"""A third-party plugin module: a head, a hookwrapper around every plugin's head registration,
and event hooks that take fewer arguments than the spec."""
import beitdist
import torch
import torch.nn.functional as F

SEEN = []


class PooledProbe(beitdist.Head):
    name = "pooled_probe"
    needs = "pooled"

    def __init__(self, backbone, options=None):
        super().__init__(backbone, options)
        self.fc = torch.nn.Linear(backbone.embed_dim, 3)

    def forward(self, features, bool_masked_pos=None):
        return self.fc(features)

    def loss(self, output, batch):
        return F.cross_entropy(output.logits, batch["labels"])


def _add(registry):  # a helper between the hook and registry.add: provenance still found
    registry.add(PooledProbe)


@beitdist.hookimpl
def beitdist_register_heads(registry):
    _add(registry)


@beitdist.hookimpl(wrapper=True)
def beitdist_register_tokenizers(registry):
    SEEN.append(("tokenizers before", len(registry.names())))
    result = yield
    SEEN.append(("tokenizers after", len(registry.names())))
    return result


@beitdist.hookimpl(hookwrapper=True)
def beitdist_register_datasets():
    SEEN.append("datasets (old-style wrapper, no arguments)")
    yield


@beitdist.hookimpl
def beitdist_on_train_start():
    SEEN.append("train start (no arguments)")


@beitdist.hookimpl
def beitdist_on_step_end(step):
    SEEN.append(("step", step))
'''


@pytest.fixture
def third_party_site(tmp_path, monkeypatch):
    """An installed distribution (dist-info with an entry point of the group `beitdist`) on
    sys.path: discovery goes through importlib.metadata exactly as for site-packages."""
    site = tmp_path / "site"
    (site / "probe_plugin-1.2.dist-info").mkdir(parents=True)
    (site / "probe_plugin.py").write_text(THIRD_PARTY_MODULE)
    (site / "probe_plugin-1.2.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: probe-plugin\nVersion: 1.2\n")
    (site / "probe_plugin-1.2.dist-info" / "entry_points.txt").write_text("[beitdist]\nprobe = probe_plugin\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    plugins.reset()
    yield site
    plugins.reset()
    import sys
    sys.modules.pop("probe_plugin", None)


def test_entry_point_plugin_with_wrappers_and_fewer_argument_impls(third_party_site, tmp_path):
    import probe_plugin

    registries = plugins.get_registries()
    entry = registries.heads.entry("pooled_probe")
    assert (entry.plugin, entry.package) == ("probe", "probe-plugin 1.2")
    assert registries.heads.entry("classification").package == plugins.BUILTIN_PACKAGE
    # the new-style wrapper saw the registry before and after every tokenizer impl ran
    assert probe_plugin.SEEN[:3] == [("tokenizers before", 0), ("tokenizers after", len(registries.tokenizers.names())),
                                    "datasets (old-style wrapper, no arguments)"]
    assert registries.tokenizers.names() and registries.datasets.names()
    assert "probe" in [c.name for c in registries.callbacks]
    context = TrainContext(run_name="probe", run_dir=tmp_path)
    plugins.emit("beitdist_on_train_start", context=context)
    plugins.emit("beitdist_on_step_end", context=context, step=7, metrics={})
    assert probe_plugin.SEEN[-2:] == ["train start (no arguments)", ("step", 7)]
    model = beitdist.build_model(TINY, "pooled_probe")
    assert model(torch.zeros(2, 3, 32, 32)).logits.shape == (2, 3)


# ---------------------------------------------------------------- meta-tests
HOOKS = [name for name in dir(hookspecs) if name.startswith("beitdist_")]


def test_hook_lists_cover_every_hookspec():
    assert sorted(HOOKS) == sorted(hookspecs.REGISTRATION_HOOKS + hookspecs.EVENT_HOOKS)


@pytest.mark.parametrize("hook", HOOKS)
def test_every_hookspec_has_a_test_and_documentation(hook):
    tests = set()
    for path in (ROOT / "tests").glob("test_*.py"):
        tests |= {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.FunctionDef)}
    assert f"test_{hook}" in tests, f"no test named test_{hook}"
    docs = (ROOT / "docs" / "plugins.md").read_text()
    assert re.search(rf"^### `{hook}`", docs, re.M), f"docs/plugins.md has no section for {hook}"
    assert getattr(hookspecs, hook).__doc__, f"{hook} has no docstring"
