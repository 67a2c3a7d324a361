"""The example plugin package (examples/beitdist-example-head), installed for real with pip.

The package is built and installed offline (`--no-index --no-build-isolation`: the setuptools
already here builds it) into a private `--target` directory that is put on the path of this
module's subprocesses (PYTHONPATH) and, for one in-process test, on `sys.path`. Discovery then
goes through the `beitdist` entry-point group exactly as for a package in site-packages, while the
shared Python environment is never modified: other test runs using it at the same time (or a run
killed half-way) cannot see a half-installed or already-uninstalled plugin. The directory is
removed when the module ends.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import beitdist
from beitdist import plugins
from beitdist.schema import OptionsError

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "beitdist-example-head"
PIXELS = ROOT / "examples" / "beitdist-masked-pixels"  # the guide's worked example
GUIDE = ROOT / "docs" / "writing-a-head-plugin.md"
PIP_INSTALL_OFFLINE = ("install", "--no-deps", "--no-build-isolation", "--no-index", "--disable-pip-version-check")
TINY = beitdist.BackboneConfig(embed_dim=32, depth=4, num_heads=4, image_size=32, patch_size=8)


def _run(args: list[str], env: dict[str, str], cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=120, cwd=cwd)


def _env(site: Path | None = None, **changes: str) -> dict[str, str]:
    """This environment with plugin autoload on (whatever the caller's shell says), `site` first on
    PYTHONPATH, plus `changes`."""
    env = {k: v for k, v in os.environ.items() if k != plugins.DISABLE_AUTOLOAD_ENV}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    env.update(changes)
    return env


def _pip_install(source: Path, site: Path) -> None:
    """Build from a copy (setuptools writes build/ and *.egg-info next to setup.cfg) into `site`."""
    ignore = shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    build = Path(shutil.copytree(source, site.parent / f"{site.name}-src", ignore=ignore))
    result = _run([sys.executable, "-m", "pip", *PIP_INSTALL_OFFLINE, "--target", str(site), str(build)], env=_env())
    assert result.returncode == 0, f"pip install {source} failed:\n{result.stdout}\n{result.stderr}"


def _beitdist(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return _run([sys.executable, "-m", "beitdist", *args], env=env)


def installed_site(package: Path, tmp_path_factory: pytest.TempPathFactory, label: str):
    """Yield a private directory `package` is pip-installed into; removed afterwards (the
    "uninstall" of a --target install: nothing in the shared environment changes)."""
    site = tmp_path_factory.mktemp(label) / "site"
    try:
        _pip_install(package, site)
        yield site
    finally:
        shutil.rmtree(site, ignore_errors=True)
        plugins.reset()


@pytest.fixture(scope="module")
def example_site(tmp_path_factory):
    """The directory the example package is pip-installed into."""
    yield from installed_site(EXAMPLE, tmp_path_factory, "example")


@pytest.fixture(scope="module")
def pixels_site(tmp_path_factory):
    """The directory the masked-pixels example package (the guide's) is pip-installed into."""
    yield from installed_site(PIXELS, tmp_path_factory, "pixels")


def test_plugins_command_lists_the_example_head_with_its_package(example_site):
    result = _beitdist("plugins", env=_env(example_site))
    assert result.returncode == 0, result.stderr
    line = r"^  linear_probe +beitdist-example-head 0\.1\.0 +\(linear_probe\)$"
    assert re.search(line, result.stdout, re.M), result.stdout
    assert re.search(r"^  classification +beitdist \(built-in\)", result.stdout, re.M)


def test_disable_autoload_hides_the_example_head(example_site):
    result = _beitdist("plugins", env=_env(example_site, **{plugins.DISABLE_AUTOLOAD_ENV: "1"}))
    assert result.returncode == 0, result.stderr
    assert "linear_probe" not in result.stdout
    assert "classification" in result.stdout  # built-ins stay


def test_reset_picks_up_the_installed_package_in_this_process(example_site, monkeypatch, tmp_path):
    monkeypatch.delenv(plugins.DISABLE_AUTOLOAD_ENV, raising=False)
    monkeypatch.syspath_prepend(str(example_site))
    plugins.reset()
    try:
        assert plugins.get_registries().heads.entry("linear_probe").package == "beitdist-example-head 0.1.0"
        model = beitdist.build_model(TINY, "linear_probe", {"num_classes": 3, "block_indices": [1, -1]})
        assert model.config.pooling == "none" and model.head.block_indices == (1, 3)
        assert model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 2, 3)

        beitdist.save_checkpoint(model, tmp_path / "probe")
        loaded = beitdist.load_model(tmp_path / "probe", head="linear_probe")
        assert loaded.head.options() == model.head.options()
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in model.state_dict().items())

        with pytest.raises(OptionsError, match=r"^head\.options\.use_cls: the CLS token is not available"):
            beitdist.build_model(TINY, "linear_probe", {"use_cls": True})
        with pytest.raises(OptionsError, match=r"^head\.options\.block_indices: block 4 is out of range .* depth 4"):
            beitdist.build_model(TINY, "linear_probe", {"block_indices": [0, 4]})
    finally:
        plugins.reset()
        for module in [m for m in sys.modules if m.split(".")[0] == "beitdist_example_head"]:
            del sys.modules[module]


TRAIN_ON_DIGITS = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    import beitdist

    torch.manual_seed(0)
    config = beitdist.BackboneConfig(embed_dim=32, depth=4, num_heads=4, image_size=32, patch_size=8)
    options = {"num_classes": 10, "block_indices": [1, -1], "batch_norm": True}
    model = beitdist.build_model(config, "linear_probe", options)

    digits = load_digits()  # 8x8 greyscale in [0, 16], shipped with scikit-learn
    images = torch.tensor(digits.images[:384], dtype=torch.float32).unsqueeze(1) / 16.0
    pixel_values = (F.interpolate(images, size=32, mode="bilinear").expand(-1, 3, -1, -1) - 0.5) / 0.5
    labels = torch.tensor(digits.target[:384])

    model.train()
    model.backbone.requires_grad_(False).eval()  # linear probing: the backbone stays frozen
    frozen = {k: v.clone() for k, v in model.backbone.state_dict().items()}
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=3e-2, weight_decay=1e-4)
    batch = {"pixel_values": pixel_values, "labels": labels}  # full batch: a smooth, repeatable curve
    losses = []
    for step in range(20):
        out = model(batch["pixel_values"])
        loss = model.loss(out, batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())

    metrics = model.head.compute_metrics(model.head.metric_state(out, batch))
    unchanged = all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in frozen.items())
    print(f"shape={tuple(out.logits.shape)} frozen={unchanged} metrics={sorted(metrics)}")
    print(f"first={losses[0]:.4f} last={losses[-1]:.4f}")
    """
)


def test_linear_probe_trains_on_digits_in_a_fresh_interpreter(example_site):
    result = _run([sys.executable, "-c", TRAIN_ON_DIGITS], env=_env(example_site))
    assert result.returncode == 0, result.stderr
    assert "shape=(384, 2, 10) frozen=True metrics=['top1', 'top1_block1', 'top1_block3']" in result.stdout
    first, last = map(float, re.search(r"first=(\S+) last=(\S+)", result.stdout).groups())
    assert last < 0.85 * first, result.stdout  # two summed cross-entropies: 4.6 -> ~3.3


BROKEN_HEAD = """
import torch.nn.functional as F

import beitdist
from beitdist.heads.base import NoOptions


class Impostor(beitdist.Head):
    name = "classification"  # already taken by the built-in head
    Options = NoOptions
    needs = "pooled"

    def forward(self, features, bool_masked_pos=None):
        return features

    def loss(self, output, batch):
        return F.cross_entropy(output.logits, batch["labels"])


@beitdist.hookimpl
def beitdist_register_heads(registry):
    registry.add(Impostor)
"""


def test_broken_plugin_fails_with_one_line_naming_it_and_its_package(tmp_path):
    """A third-party package reusing a built-in name (installed like the example: in the shared
    environment it would break every beitdist process there for as long as it stayed)."""
    source = tmp_path / "src"
    (source / "beitdist_broken_head").mkdir(parents=True)
    (source / "beitdist_broken_head" / "__init__.py").write_text(BROKEN_HEAD)
    (source / "pyproject.toml").write_text((EXAMPLE / "pyproject.toml").read_text())
    (source / "setup.cfg").write_text(
        "[metadata]\nname = beitdist-broken-head\nversion = 0.0.1\n\n"
        "[options]\npackages = beitdist_broken_head\n\n"
        "[options.entry_points]\nbeitdist =\n    impostor = beitdist_broken_head\n"
    )
    site = tmp_path / "site"
    try:
        _pip_install(source, site)
        result = _beitdist("plugins", env=_env(site))
    finally:
        shutil.rmtree(site, ignore_errors=True)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith("beitdist plugins: error: plugin 'impostor' (package beitdist-broken-head 0.0.1)")
    assert "'classification', already taken by plugin 'beitdist.heads.classification'" in lines[0]


FENCE = re.compile(r"(?:<!-- excerpt: (?P<source>\S+) -->\n)?```python\n(?P<code>.*?)```", re.S)


def test_guide_code_blocks_are_real_and_run(pixels_site, tmp_path):
    """docs/writing-a-head-plugin.md (worked example: examples/beitdist-masked-pixels): its excerpts
    are in the example's source, and its Python blocks run in order as one script, with the package
    installed, ending with the test function it shows."""
    script, tests = [], []
    for match in FENCE.finditer(GUIDE.read_text()):
        code, source = match["code"], match["source"]
        if source:
            assert code.strip() in (ROOT / source).read_text(), f"the guide's excerpt is not in {source}:\n{code}"
        script.append(code)
        tests += re.findall(r"^def (test_\w+)\(monkeypatch\):", code, re.M)
    assert len(script) >= 10 and tests
    script += ["import pytest\n"] + [f"with pytest.MonkeyPatch.context() as mp:\n    {name}(mp)\n" for name in tests]
    (tmp_path / "guide.py").write_text("\n".join(script))
    result = _run([sys.executable, "guide.py"], env=_env(pixels_site), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
