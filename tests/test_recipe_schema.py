"""`beitdist schema`: the JSON Schema editors use for recipe files agrees with the recipe parser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from beitdist.recipe import parse_recipe
from beitdist.recipe_schema import recipe_json_schema

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").glob("*.yaml")) + sorted((ROOT / "examples").glob("*/recipes/*.yaml"))


@pytest.fixture(scope="module")
def validator() -> jsonschema.Draft202012Validator:
    schema = recipe_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _problems(validator, document) -> list[str]:
    return sorted(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(document))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_validates(validator, path):
    assert _problems(validator, yaml.safe_load(path.read_text())) == []


BAD = {
    "unknown top-level key": ({"optimm": {}}, ""),
    "unknown section key": ({"optim": {"lrr": 0.1}}, "optim"),
    "wrong type": ({"train": {"steps": "many"}}, "train.steps"),
    "not a float": ({"optim": {"lr": "fast"}}, "optim.lr"),
    "choice": ({"data": {"dataset": "digits", "on_corrupt": "ignore"}}, "data.on_corrupt"),
    "variant": ({"model": {"variant": "gigantic"}}, "model.variant"),
    "backbone field": ({"model": {"backbone": {"dept": 2}}}, "model.backbone"),
    "head option": ({"head": {"name": "classification", "options": {"num_clases": 3}}}, "head.options"),
    "head option type": ({"head": {"name": "classification", "options": {"num_classes": 2.5}}},
                         "head.options.num_classes"),
    "dataset option": ({"data": {"dataset": "digits", "options": {"val_fractio": 0.1}}}, "data.options"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_what_the_parser_refuses_the_schema_flags_at_the_same_field(validator, case):
    document, where = BAD[case]
    problems = _problems(validator, document)
    assert problems and any(p.startswith(f"{where}:") for p in problems), problems
    with pytest.raises(Exception):
        recipe = parse_recipe(document)
        recipe.model.backbone_config()


def test_yaml_1_1_floats_numbers_and_square_sizes_are_accepted_as_the_parser_accepts_them(validator):
    document = {"optim": {"lr": "1e-3"}, "model": {"variant": "tiny", "backbone": {"image_size": 32, "depth": 2}},
                "head": {"name": "classification", "options": {"num_classes": 10}}}
    assert _problems(validator, document) == []
    parse_recipe(document).model.backbone_config()


def test_fields_carry_their_docstrings_and_defaults_for_editor_hovers():
    props = recipe_json_schema()["properties"]
    corrupt = props["data"]["properties"]["on_corrupt"]
    assert corrupt["enum"] == ["stop", "skip"] and corrupt["default"] == "stop"
    assert "undecodable" in corrupt["description"]
    assert "inherit" in props and props["model"]["properties"]["backbone"]["properties"]["depth"]["type"] == "integer"


def test_cli_prints_the_schema_as_json():
    out = subprocess.run([sys.executable, "-m", "beitdist", "schema"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["title"] == "beitdist recipe"
