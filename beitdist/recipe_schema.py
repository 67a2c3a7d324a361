"""A JSON Schema of recipe files, generated from the recipe dataclasses and the installed plugins.

Editors (the YAML language server in VS Code, neovim, JetBrains) use it to complete keys, show the
field docstrings on hover and underline unknown keys and wrong types while a recipe is typed. The
hand-written parser (`beitdist.schema.parse` + each section's `__post_init__`) stays the judge: its
range checks and cross-field rules are not all expressible here, and its messages are better.
The schema is generated, never written by hand, so it cannot drift from the dataclasses: every
section and every installed plugin's `Options` (head, tokenizer, dataset) is covered.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap
import types
from collections.abc import Mapping
from functools import lru_cache
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"
FLOAT_TEXT = r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$"
"""PyYAML (YAML 1.1) reads `1e-3` as a string and the recipe parser accepts it as a float."""


@lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under a dataclass's fields (`x: int = 1` then `\"\"\"...\"\"\"`), the
    convention of this code base, read from the source; {} when the source is not available."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def type_schema(tp: Any) -> dict[str, Any]:
    """The JSON Schema of one annotation, accepting what `beitdist.schema.parse` accepts."""
    origin = get_origin(tp)
    if tp is Any:
        return {}
    if origin in (Union, types.UnionType):
        options = [type_schema(arg) for arg in get_args(tp)]
        return {} if {} in options else {"anyOf": options}
    if origin is Literal:
        return {"enum": list(get_args(tp))}
    if origin in (tuple, list):
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            return {"type": "array", "prefixItems": [type_schema(a) for a in args],
                    "minItems": len(args), "maxItems": len(args)}
        return {"type": "array", "items": type_schema(args[0]) if args else {}}
    if origin in (dict, Mapping):
        args = get_args(tp)
        return {"type": "object", "additionalProperties": type_schema(args[1]) if args else {}}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return dataclass_schema(tp)
    if tp is bool:
        return {"type": "boolean"}
    if tp is int:
        return {"type": "integer"}
    if tp is float:
        return {"anyOf": [{"type": "number"}, {"type": "string", "pattern": FLOAT_TEXT}]}
    if tp is str:
        return {"type": "string"}
    if tp is type(None):
        return {"type": "null"}
    return {}


def _json_default(value: Any) -> tuple[bool, Any]:
    from beitdist.schema import to_dict

    plain = to_dict(value)
    try:
        json.dumps(plain)
    except (TypeError, ValueError):
        return False, None
    return True, plain


def dataclass_schema(cls: type) -> dict[str, Any]:
    """An object schema: one property per init field (its type, default and docstring), no other
    keys. Nothing is marked required: a recipe that inherits states only what it changes, and the
    parser names a missing field better than an editor can."""
    hints = get_type_hints(cls)
    docs = field_docs(cls)
    properties: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        prop = dict(type_schema(hints[f.name]))
        if f.default is not dataclasses.MISSING:
            ok, plain = _json_default(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            ok, plain = _json_default(f.default_factory())
        else:
            ok, plain = False, None
        if ok and not dataclasses.is_dataclass(hints[f.name]):
            prop["default"] = plain
        if f.name in docs:
            prop["description"] = docs[f.name]
        properties[f.name] = prop
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    doc = inspect.getdoc(cls)
    if doc and not doc.startswith(f"{cls.__name__}("):  # dataclasses invent a signature docstring
        schema["description"] = " ".join(doc.split("\n\n")[0].split())
    return schema


def _plugin_options(section: dict[str, Any], key: str, plugins: Mapping[str, Any]) -> None:
    """`options` of a plugin section: the named plugin's Options schema (if/then per name), and
    the name itself completed from the installed plugins."""
    props = section["properties"]
    props[key] = {**props[key], "anyOf": [{"enum": sorted(plugins)}, {"type": "string"}]}
    section["allOf"] = [
        {"if": {"properties": {key: {"const": name}}, "required": [key]},
         "then": {"properties": {"options": dataclass_schema(cls.Options)}}}
        for name, cls in sorted(plugins.items()) if dataclasses.is_dataclass(getattr(cls, "Options", None))
    ]


def recipe_json_schema() -> dict[str, Any]:
    """The schema of a recipe file: the Recipe dataclass tree, `inherit:`, the backbone fields
    `model.backbone` may override, and every installed head / tokenizer / dataset's options."""
    from beitdist.backbone.config import VARIANTS, BackboneConfig
    from beitdist.plugins import get_registries
    from beitdist.recipe import INHERIT_KEY, Recipe

    schema = dataclass_schema(Recipe)
    props = schema["properties"]
    props[INHERIT_KEY] = {"type": "string", "description": "A base recipe (path relative to this file) whose "
                          "values this file overrides; plugin options start fresh when the plugin name changes."}
    model = props["model"]["properties"]
    model["variant"]["enum"] = list(VARIANTS)
    backbone = dataclass_schema(BackboneConfig)
    size = backbone["properties"]["image_size"]  # `variant()` takes one side for a square, as recipes write it
    backbone["properties"]["image_size"] = {**size, "anyOf": [{"type": "integer"}, {"type": "array", "items":
                                            {"type": "integer"}, "minItems": 2, "maxItems": 2}]}
    for key in ("type", "prefixItems", "minItems", "maxItems"):
        backbone["properties"]["image_size"].pop(key, None)
    model["backbone"] = {**backbone, "description": model["backbone"].get("description", "")}
    registries = get_registries()
    for section, key, registry in (("head", "name", registries.heads), ("tokenizer", "name", registries.tokenizers),
                                   ("data", "dataset", registries.datasets)):
        _plugin_options(props[section], key, {name: registry.get(name) for name in registry.names()})
    return {"$schema": SCHEMA_DIALECT, "title": "beitdist recipe",
            "description": "A beitdist training recipe (YAML). Generated by `beitdist schema`.", **schema}


def add_schema_cli(commands: Any) -> None:
    """`beitdist schema`: print the recipe JSON Schema (redirect it to a file for an editor)."""
    parser = commands.add_parser(
        "schema", help="print the JSON Schema of recipe files (for editors: completion, hover docs, checks)",
        description="Print the JSON Schema of recipe files, generated from the recipe dataclasses and the "
        "installed plugins: beitdist schema > recipe.schema.json (see docs/recipes.md, 'Editor support').")
    parser.set_defaults(run=_cmd_schema)


def _cmd_schema(args: Any) -> int:
    print(json.dumps(recipe_json_schema(), indent=2))
    return 0
