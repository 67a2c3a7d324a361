"""One home per engine: only `beitdist/engines/deepspeed/` imports DeepSpeed and only
`beitdist/engines/fairscale/` imports fairscale. Read with `ast`, so a comment or docstring that
names an engine does not count, while every form of import does (`import x`, `from x import y`,
and `importlib.import_module("x")` / `__import__("x")` with a literal name)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "beitdist"
HOMES = {"deepspeed": PACKAGE / "engines" / "deepspeed", "fairscale": PACKAGE / "engines" / "fairscale"}


def imported_modules(tree: ast.AST, full: bool = False) -> list[tuple[int, str]]:
    """(line, top-level module name) of every absolute import in a module (the whole dotted name
    with `full`)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                and isinstance(node.args[0].value, str):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if name in ("import_module", "__import__"):
                found.append((node.lineno, node.args[0].value))
    return sorted((line, module if full else module.split(".")[0]) for line, module in found)


def modules_outside(home: Path) -> list[tuple[Path, ast.AST]]:
    return [(path, ast.parse(path.read_text(encoding="utf-8"), str(path)))
            for path in sorted(PACKAGE.rglob("*.py")) if not path.is_relative_to(home)]


def test_the_scan_sees_imports_and_not_prose():
    code = ('"""Uses DeepSpeed: import deepspeed"""\n# from fairscale import OSS\n'
            "import deepspeed.comm as c\nfrom fairscale.optim import OSS\n"
            "def f():\n    importlib.import_module('deepspeed.ops')\n    from .deepspeed import x\n")
    assert imported_modules(ast.parse(code)) == [(3, "deepspeed"), (4, "fairscale"), (6, "deepspeed")]


@pytest.mark.parametrize("library", sorted(HOMES))
def test_only_the_engine_package_imports_its_library(library):
    home = HOMES[library]
    outside = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path, tree in modules_outside(home)
               for line, module in imported_modules(tree) if module == library]
    assert not outside, f"{library} imported outside {home.relative_to(PACKAGE.parent)}: {', '.join(outside)}"
    assert any(module == library for path in home.rglob("*.py")
               for _, module in imported_modules(ast.parse(path.read_text(encoding="utf-8")))), \
        f"nothing in {home} imports {library}: the scan is looking in the wrong place"


def test_deepspeed_is_imported_through_its_package_only():
    """`import_deepspeed` (DeepSpeed without its mlflow and inductor side imports) is the engine
    package's own helper: code outside asks the package's modules, which import DeepSpeed."""
    helper = "beitdist.engines.deepspeed.importing"
    outside = [f"{path.relative_to(PACKAGE.parent)}:{line}" for path, tree in modules_outside(HOMES["deepspeed"])
               for line, module in imported_modules(tree, full=True) if module == helper]
    assert not outside, f"{helper} imported outside its package: {', '.join(outside)}"
