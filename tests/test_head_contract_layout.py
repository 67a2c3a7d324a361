"""Where head-specific code may live: heads own their behaviour (issue 19).

The rule, checked on the source with `ast`:

1. No module under beitdist/ outside beitdist/heads/ contains a string constant equal to the name
   of a built-in head (the names of the heads the built-in plugins register: "classification",
   "mim", "segmentation"). Every string constant counts: code, docstrings, f-string pieces,
   `Literal[...]` arguments; a name inside a longer string ("the mim head needs ...") does not.
   A default head name outside the heads comes from `beitdist.heads.DEFAULT_HEAD`. So no module
   can branch on a built-in head's name; what differs between heads is asked of the head.
2. beitdist/backbone/ imports nothing that knows heads (beitdist.heads, beitdist.formats,
   beitdist.plugins): conversion of a head's weights goes through `beitdist.formats`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from beitdist import plugins

PACKAGE = Path(__file__).resolve().parents[1] / "beitdist"
HEAD_AWARE = ("beitdist.heads", "beitdist.formats", "beitdist.plugins")


def _builtin_head_names() -> set[str]:
    return {entry.name for entry in plugins.get_registries().heads if entry.package == plugins.BUILTIN_PACKAGE}


def _modules(under: Path, skip: Path | None = None) -> list[Path]:
    return sorted(p for p in under.rglob("*.py") if skip is None or skip not in p.parents)


def test_builtin_head_names_are_the_three_known_ones():
    assert _builtin_head_names() >= {"classification", "mim", "segmentation"}


@pytest.mark.parametrize("path", _modules(PACKAGE, skip=PACKAGE / "heads"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_builtin_head_name_outside_the_heads(path):
    names = _builtin_head_names()
    found = [f"line {node.lineno}: {node.value!r}" for node in ast.walk(ast.parse(path.read_text(), str(path)))
             if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names]
    assert not found, f"{path.relative_to(PACKAGE.parent)} names built-in heads ({'; '.join(found)}): ask the head instead"


@pytest.mark.parametrize("path", _modules(PACKAGE / "backbone"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_backbone_knows_no_head(path):
    imported = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported += [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
    bad = sorted({m for m in imported if m.startswith(HEAD_AWARE)})
    assert not bad, f"{path.relative_to(PACKAGE.parent)} imports {bad}"
