"""`beitdist validate RECIPE [RECIPE ...] [--set KEY=VALUE ...] [--skip-paths]`.

Checks each recipe as a launch would before starting anything: YAML, `inherit:` chain, `--set`
overrides, the schema (field paths, did-you-mean), the plugins named by head / tokenizer / dataset
and their own option schemas, consistency between engine, data and scaling; and, unless
`--skip-paths` (recipes meant for a cluster whose data is not mounted here), that the dataset's
files exist: an Options field called `root` or `path`, and the shards of `tar_shards` (also that
there are enough of them for every rank and loader worker to get one), and the preflight
(`beitdist.preflight`: labels vs the head's classes, output_dir writable with room for a checkpoint,
an existing run's model vs the recipe, precision vs this machine's devices).

Prints `ok: <file>` per good file (stdout) and one line `error: <file>: <field>: <problem>` per bad
file (stderr). Exit 0 when all are ok, 2 otherwise. Files the run itself produces first (a codebook,
`model.init` from an earlier run) are not checked: they may not exist yet.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from beitdist.data import remote
from beitdist.errors import InputError
from beitdist.recipe import Recipe, RecipeError, load_recipe

EXIT_OK, EXIT_BAD_INPUT = 0, 2
PATH_FIELDS = ("root", "path")
"""Dataset Options fields holding a local file or directory."""


def path_problems(recipe: Recipe) -> list[str]:
    """'<field path>: <problem>' for every dataset file the recipe names that is not on this machine."""
    options = recipe.dataset_options()
    problems = []
    for name in PATH_FIELDS:
        value = getattr(options, name, None)
        if isinstance(value, str) and remote.is_remote(value):
            continue  # checked by the dataset when it lists the store (credentials may be the workers')
        if isinstance(value, str) and not Path(value).expanduser().exists():
            problems.append(f"data.options.{name}: {value!r} does not exist on this machine "
                            "(use --skip-paths for a recipe meant for another machine)")
    if recipe.data.dataset == "tar_shards":
        problems += _shard_problems(recipe, options)
    return problems


def _shard_problems(recipe: Recipe, options: Any) -> list[str]:
    from beitdist.data.tar_shards import expand_paths

    problems = []
    for split in ("train", "val"):
        patterns = getattr(options, split, ())
        if not patterns:
            continue
        try:
            shards = expand_paths(patterns, getattr(options, "storage_options", None))
        except ValueError as err:
            missing = re.search(r"\['([^']+)'", str(err))
            first = f"e.g. {missing.group(1)!r} " if missing else ""
            problems.append(f"data.options.{split}: shards of {list(patterns)} not found on this machine ({first}is "
                            "missing; use --skip-paths for a recipe meant for another machine)")
            continue
        readers = recipe.scaling.num_workers * max(1, recipe.data.num_workers)
        if split == "train" and len(shards) < readers:
            problems.append(
                f"data.options.train: {len(shards)} shards for {readers} readers (scaling.num_workers "
                f"{recipe.scaling.num_workers} x data.num_workers {recipe.data.num_workers}): some ranks would get "
                "no samples and the run would hang at the first collective; use more shards or fewer workers")
    return problems


def validate_file(path: str | Path, overrides: list[str] | None = None, check_paths: bool = True) -> Recipe:
    """Load and check one recipe; raises RecipeError '<file>: <field>: <problem>'."""
    recipe = load_recipe(path, overrides or [])
    if check_paths:
        problems = path_problems(recipe)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise RecipeError(f"{path}: {problems[0]}{more}")
    return recipe


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _cmd_validate(args: argparse.Namespace) -> int:
    from beitdist.launcher import uses_gpu
    from beitdist.preflight import preflight

    bad = 0
    for path in args.recipes:
        try:
            recipe = validate_file(path, args.set, check_paths=not args.skip_paths)
            preflight(recipe, this_machine=not args.skip_paths, gpu=uses_gpu(recipe))
        except InputError as err:  # RecipeError, PreflightError, a plugin that fails to load (PluginError)
            message = str(err) if str(err).startswith(str(path)) else f"{path}: {err}"
            print(f"error: {_one_line(message)}", file=sys.stderr)
            bad += 1
        else:
            print(f"ok: {path}")
    sys.stdout.flush()
    return EXIT_BAD_INPUT if bad else EXIT_OK


def add_validate_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `validate` on the CLI's subparsers (sets `run`); returns its parser."""
    parser = subparsers.add_parser(
        "validate",
        help="check recipes (schema, plugins, options, data paths) without running anything",
        description="Load and check each recipe as `beitdist launch` would, without starting anything. "
        "Prints 'ok: FILE' per good recipe and one 'error: FILE: FIELD: PROBLEM' line per bad one; "
        "exits 2 if any is bad.",
    )
    parser.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe YAML file(s)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field in every recipe (value read as YAML), e.g. optim.lr=1e-3")
    parser.add_argument("--skip-paths", action="store_true",
                        help="do not check that dataset files exist (recipes meant for a cluster)")
    parser.set_defaults(run=_cmd_validate)
    return parser


__all__ = ["add_validate_cli", "path_problems", "validate_file"]
