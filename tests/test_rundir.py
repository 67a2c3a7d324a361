"""One home for the run directory's layout (`beitdist.run.rundir.RunDir`): its paths are the names
runs have always had on disk (earlier runs must still resume), and no module outside beitdist/run/
spells those names itself. The scan reads the code with `ast`: docstrings and comments that name a
file do not count, string literals do (plain, and the literal parts of f-strings)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from beitdist.run.rundir import RunDir

PACKAGE = Path(__file__).resolve().parents[1] / "beitdist"
HOME = PACKAGE / "run"
LAYOUT_NAMES = ("checkpoints", "final", "train_result.json", "progress.json", "beitdist_state.json", "mlflow.db",
                "mlflow_run_id", "launch.json", "workers")
"""Every name of the run layout; only beitdist/run/ may write them as string literals."""


def test_paths_are_the_historical_names(tmp_path):
    run = RunDir(tmp_path / "runs" / "r")
    root = tmp_path / "runs" / "r"
    assert run.path == root
    assert run.checkpoints == root / "checkpoints"
    assert run.tag("step_4") == root / "checkpoints" / "step_4"
    assert run.state_file("step_4") == root / "checkpoints" / "step_4" / "beitdist_state.json"
    assert run.state_file("step_4_universal") == root / "checkpoints" / "step_4" / "beitdist_state.json"
    assert run.final == root / "final"
    assert run.result_file == root / "train_result.json"
    assert run.progress_file == root / "progress.json"
    assert run.mlflow_db == root / "mlflow.db"
    assert run.mlflow_run_id_file == root / "mlflow_run_id"
    assert run.launch_record == root / "launch.json"
    assert run.workers == root / "workers"
    assert run.worker_record(1) == root / "workers" / "rank_1.json"
    assert RunDir.STATE_FILE == "beitdist_state.json" and RunDir(str(root)) == run


def test_markers_recognise_a_run_directory(tmp_path):
    assert RunDir.MARKERS == ("checkpoints", "final", "train_result.json", "mlflow.db",
                                                 "launch.json", "progress.json", "mlflow_run_id")
    assert not RunDir.markers(tmp_path) and not RunDir.markers(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("x")
    assert RunDir.markers(tmp_path) == []
    (tmp_path / "progress.json").write_text("{}")
    (tmp_path / "checkpoints").mkdir()
    assert RunDir.markers(tmp_path) == ["checkpoints", "progress.json"]


def layout_literals(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, name) of every string literal that is exactly a layout name, docstrings excepted."""
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            parts = [node.value] + [part.strip("/") for part in node.value.split("/")]
            found += [(node.lineno, name) for name in LAYOUT_NAMES if name in parts]
    return sorted(set(found))


def test_the_scan_sees_literals_and_not_prose():
    code = ('"""Writes train_result.json and final/."""\n'
            "def f(run_dir, rank):\n    \"\"\"final\"\"\"\n    # progress.json\n"
            "    a = run_dir / 'final'\n    b = f'{run_dir}/checkpoints/{rank}'\n    c = 'finally'\n"
            "    return run_dir / 'workers/rank_0.json'\n")
    assert layout_literals(ast.parse(code)) == [(5, "final"), (6, "checkpoints"), (8, "workers")]


@pytest.mark.parametrize("path", sorted(p for p in PACKAGE.rglob("*.py") if not p.is_relative_to(HOME)),
                         ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_module_outside_run_spells_the_layout(path):
    found = layout_literals(ast.parse(path.read_text(encoding="utf-8"), str(path)))
    assert not found, (f"{path.relative_to(PACKAGE.parent)} spells the run layout itself "
                       f"({', '.join(f'line {line}: {name!r}' for line, name in found)}); ask beitdist.run.rundir.RunDir")


def test_the_layout_has_its_home():
    found = {name for path in HOME.rglob("*.py") for _, name in layout_literals(ast.parse(path.read_text()))}
    assert found == set(LAYOUT_NAMES), "the scan is looking in the wrong place"
