"""Recipes: every shipped recipe validates; inherit, --set, typed scaling/tracking, error messages
(one line naming the file and the field path), `beitdist validate`, and a property test that
parse_recipe never raises anything but RecipeError."""

from __future__ import annotations

import argparse
import copy
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from beitdist.recipe import (
    Recipe,
    RecipeError,
    ScalingSection,
    TrackingSection,
    apply_overrides,
    load_recipe,
    merge_recipes,
    parse_recipe,
    resolve_recipe_file,
)
from beitdist.recipe_cli import add_validate_cli, path_problems, validate_file

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
LOCAL = {"quickstart.yaml", "quickstart_pretrain.yaml"}
"""Recipes whose data is on every machine (scikit-learn digits); the others name cluster paths."""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(RecipeError) as info:
        fn(*args, **kwargs)
    message = str(info.value)
    assert len(message.splitlines()) == 1, message
    return message


def run_validate(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    add_validate_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["validate", *argv])
    return args.run(args)


# ------------------------------------------------------------------------------ shipped recipes
def test_recipes_exist():
    names = {p.name for p in RECIPES}
    expected = {"beit_base_pretrain_in22k.yaml", "beit_large_pretrain_in22k.yaml", "beit_large_in22k.yaml",
                "beit_base_in1k_224.yaml", "beit_large_in1k_384.yaml", "cifar100_finetune.yaml",
                "ade20k_upernet_base.yaml", "ade20k_upernet_large.yaml", "quickstart_pretrain.yaml",
                "quickstart.yaml"}
    assert expected <= names


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_recipe_validates(path):
    recipe = validate_file(path, check_paths=path.name in LOCAL)
    assert parse_recipe(recipe.to_dict(), "round trip") == recipe
    assert path.read_text().lstrip().startswith("#"), "every recipe starts with a comment saying where it comes from"


def test_validate_cli_on_all_recipes(capsys):
    assert run_validate("--skip-paths", *map(str, RECIPES)) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [f"ok: {p}" for p in RECIPES]


def test_cluster_recipe_without_skip_paths_names_the_field(capsys):
    path = ROOT / "recipes" / "beit_base_in1k_224.yaml"
    message = error_of(validate_file, path)
    assert message.startswith(f"{path}: data.options.root: '/data/imagenet' does not exist")
    assert run_validate(str(path), str(ROOT / "recipes" / "quickstart.yaml")) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"ok: {ROOT / 'recipes' / 'quickstart.yaml'}"]
    assert captured.err.splitlines() == [f"error: {message}"]


# (dataset size, epochs, warmup epochs or None for warmup in steps, global batch, lr, layer decay,
#  drop path, weight decay, clip) from REFERENCE.md / the unilm commands quoted in the recipes
IN22K, IN1K, CIFAR = 14_200_000, 1_280_000, 50_000
PUBLISHED = {
    "beit_base_pretrain_in22k": (IN22K, 150, None, 2048, 1.5e-3, 1.0, 0.1, 0.05, 3.0),
    "beit_large_pretrain_in22k": (IN22K, 150, None, 2048, 1.5e-3, 1.0, 0.1, 0.05, 3.0),
    "beit_large_in22k": (IN22K, 90, 5, 2048, 2e-3, 0.75, 0.2, 0.05, 1.0),
    "beit_base_in1k_224": (IN1K, 100, 20, 1024, 4e-3, 0.65, 0.1, 0.05, 0.0),
    "beit_large_in1k_384": (IN1K, 30, 5, 512, 2e-5, 0.9, 0.4, 1e-8, 0.0),
    "cifar100_finetune": (CIFAR, 150, 20, 512, 3e-3, 0.65, 0.1, 0.05, 0.0),
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_hyperparameters_and_step_arithmetic(name):
    size, epochs, warmup_epochs, batch, lr, layer_decay, drop_path, wd, clip = PUBLISHED[name]
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    per_epoch = size // batch
    assert recipe.global_batch == batch
    assert recipe.train.steps == epochs * per_epoch
    assert recipe.optim.warmup_steps == (10_000 if warmup_epochs is None else warmup_epochs * per_epoch)
    assert (recipe.optim.lr, recipe.optim.layer_decay, recipe.optim.weight_decay, recipe.optim.clip_grad) == (
        lr, layer_decay, wd, clip)
    assert recipe.model.backbone_config().drop_path_rate == drop_path
    assert recipe.model.backbone_config().image_size == ((384, 384) if "384" in name else (224, 224))


@pytest.mark.parametrize("name, variant, lr, layer_decay, warmup, drop_path, blocks, stage", [
    ("ade20k_upernet_base", "base", 3e-5, 0.9, 1500, 0.1, (3, 5, 7, 11), 1),
    ("ade20k_upernet_large", "large", 2e-5, 0.95, 3000, 0.2, (7, 11, 15, 23), 3),
])
def test_ade20k_recipes(name, variant, lr, layer_decay, warmup, drop_path, blocks, stage):
    recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
    assert (recipe.model.variant, recipe.global_batch, recipe.train.steps) == (variant, 16, 160_000)
    assert (recipe.optim.lr, recipe.optim.layer_decay, recipe.optim.warmup_steps) == (lr, layer_decay, warmup)
    assert recipe.optim.schedule == "poly" and recipe.train.eval_mode == "slide"
    assert recipe.model.backbone_config().image_size == (640, 640)
    assert recipe.model.backbone_config().drop_path_rate == drop_path
    assert recipe.head_options().block_indices == blocks
    assert recipe.engine.stage == stage


def test_large_recipes_use_zero3_and_pretraining_uses_dalle_with_a_hash_field():
    for name in ("beit_large_pretrain_in22k", "beit_large_in22k", "beit_large_in1k_384", "ade20k_upernet_large"):
        assert load_recipe(ROOT / "recipes" / f"{name}.yaml").engine.stage == 3, name
    for name in ("beit_base_pretrain_in22k", "beit_large_pretrain_in22k"):
        recipe = load_recipe(ROOT / "recipes" / f"{name}.yaml")
        options = recipe.tokenizer_options()
        assert recipe.tokenizer.name == "dalle" and options.trust is False and options.sha256 is None
        assert "sha256" in recipe.tokenizer.options
        assert recipe.model.backbone_config().rel_pos_bias == "shared"
        assert recipe.data.num_masking_patches == 75


def test_large_in22k_recipe_is_22k_classes_on_tar_shards():
    recipe = load_recipe(ROOT / "recipes" / "beit_large_in22k.yaml")
    assert recipe.data.dataset == "tar_shards"
    assert recipe.dataset_options().num_classes == recipe.head_options().num_classes == 21841


def test_quickstart_pretrain_matches_the_quickstart_backbone():
    pre = load_recipe(ROOT / "recipes" / "quickstart_pretrain.yaml")
    fine = load_recipe(ROOT / "recipes" / "quickstart.yaml")
    assert pre.model.backbone_config().replace(rel_pos_bias="per_block") == fine.model.backbone_config()
    assert pre.model.backbone_config().rel_pos_bias == "shared"
    assert (pre.head.name, pre.tokenizer.name, pre.data.dataset) == ("mim", "codebook", "digits")
    assert pre.run_dir / "final" == Path("runs/quickstart_pretrain/final")
    assert load_recipe(ROOT / "recipes" / "quickstart.yaml",
                       ["model.init=runs/quickstart_pretrain/final"]).model.init == "runs/quickstart_pretrain/final"


# -------------------------------------------------------------------------------------- inherit
def test_inherit_deep_merges_child_wins_lists_replaced(tmp_path):
    write(tmp_path / "base.yaml", """
name: base
optim: {lr: 1.0e-3, warmup_steps: 5, betas: [0.9, 0.98]}
data: {dataset: digits, batch_size: 8, augment: {scale: [0.5, 1.0], hflip: 0.0}}
""")
    child = write(tmp_path / "child.yaml", """
inherit: base.yaml
name: child
optim: {lr: 2.0e-3, betas: [0.8, 0.9]}
data: {augment: {scale: [0.7, 1.0]}}
""")
    recipe = load_recipe(child)
    assert recipe.name == "child"
    assert (recipe.optim.lr, recipe.optim.warmup_steps, recipe.optim.betas) == (2e-3, 5, (0.8, 0.9))
    assert (recipe.data.batch_size, recipe.data.augment.scale, recipe.data.augment.hflip) == (8, (0.7, 1.0), 0.0)
    assert merge_recipes({"a": {"b": [1, 2], "c": 1}}, {"a": {"b": [3]}}) == {"a": {"b": [3], "c": 1}}


def test_inherit_chain_relative_to_each_file(tmp_path):
    write(tmp_path / "bases" / "root.yaml", "seed: 7\ntrain: {steps: 50}\n")
    write(tmp_path / "bases" / "mid.yaml", "inherit: root.yaml\ntrain: {log_every: 5}\n")
    leaf = write(tmp_path / "leaf.yaml", "inherit: bases/mid.yaml\nname: leaf\n")
    recipe = load_recipe(leaf)
    assert (recipe.seed, recipe.train.steps, recipe.train.log_every, recipe.name) == (7, 50, 5, "leaf")


def test_inherit_naming_another_plugin_drops_the_base_options(tmp_path):
    write(tmp_path / "base.yaml", "head: {name: classification, options: {num_classes: 10}}\n")
    child = write(tmp_path / "child.yaml", "inherit: base.yaml\nhead: {name: segmentation}\n")
    assert load_recipe(child).head_options().num_classes == 150
    same = write(tmp_path / "same.yaml", "inherit: base.yaml\nhead: {options: {dropout: 0.1}}\n")
    assert load_recipe(same).head.options == {"num_classes": 10, "dropout": 0.1}


def test_inherit_cycle_is_an_error(tmp_path):
    write(tmp_path / "a.yaml", "inherit: b.yaml\n")
    write(tmp_path / "b.yaml", "inherit: a.yaml\n")
    message = error_of(load_recipe, tmp_path / "a.yaml")
    assert "inherit: cycle" in message and "a.yaml" in message and "b.yaml" in message
    write(tmp_path / "self.yaml", "inherit: self.yaml\n")
    assert "cycle" in error_of(load_recipe, tmp_path / "self.yaml")


def test_inherit_missing_base_and_bad_value(tmp_path):
    child = write(tmp_path / "child.yaml", "inherit: nope.yaml\n")
    assert error_of(load_recipe, child).startswith(f"{child}: inherit: base recipe 'nope.yaml' not found")
    bad = write(tmp_path / "bad.yaml", "inherit: [a.yaml]\n")
    assert error_of(load_recipe, bad).startswith(f"{bad}: inherit: expected the path of a base recipe")


def test_errors_in_a_base_name_the_base_file(tmp_path):
    base = write(tmp_path / "base.yaml", "optim: {lr: fast}\n")
    child = write(tmp_path / "child.yaml", "inherit: base.yaml\n")
    message = error_of(load_recipe, child)
    assert message.startswith(f"{child}: optim.lr: got 'fast'") and message.endswith(f"(set in {base})")
    broken = write(tmp_path / "broken.yaml", "optim: {lr: 1\n  warmup: [\n")
    child2 = write(tmp_path / "child2.yaml", "inherit: broken.yaml\n")
    message = error_of(load_recipe, child2)
    assert message.startswith(f"{child2}: inherit 'broken.yaml': {broken}:") and "not valid YAML" in message


def test_line_breaks_in_keys_are_escaped_so_errors_stay_on_one_line():
    assert error_of(parse_recipe, {"optim": {"l\nr": 1}}, "f.yaml").startswith("f.yaml: optim.l\\nr: unknown option")


def test_parse_recipe_refuses_inherit_in_a_plain_mapping():
    assert "inherit" in error_of(parse_recipe, {"inherit": "x.yaml"}, "worker")


# ------------------------------------------------------------------------------------ overrides
def test_set_overrides_are_typed(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [
        "train.steps=12", "optim.lr=1e-3", "data.augment.hflip=0.25", "engine.zero_init=false",
        "data.augment.scale=[0.5, 1.0]", "scaling.use_gpu=false", "tracking.uri=null", "model.init=x/y",
    ])
    assert recipe.train.steps == 12 and isinstance(recipe.train.steps, int)
    assert recipe.optim.lr == 1e-3 and recipe.data.augment.hflip == 0.25
    assert recipe.engine.zero_init is False and recipe.scaling.use_gpu is False
    assert recipe.data.augment.scale == (0.5, 1.0) and recipe.tracking.uri is None
    assert recipe.model.init == "x/y"
    assert apply_overrides({}, ["a.b.c=1"]) == {"a": {"b": {"c": 1}}}


@pytest.mark.parametrize("override, expected", [
    ("train.steps", "expected KEY.PATH=VALUE"),
    ("train..steps=3", "empty key"),
    ("name.x=3", "--set 'name.x=3': name is not a section"),
    ("optim.lr=[1, ", "not valid YAML"),
    ("inherit=x.yaml", "cannot be overridden"),
])
def test_set_override_syntax_errors(override, expected):
    path = ROOT / "recipes" / "quickstart.yaml"
    message = error_of(load_recipe, path, [override])
    assert message.startswith(f"{path}: --set ") and expected in message, message


def test_set_override_with_a_wrong_type_names_the_field_and_the_override():
    path = ROOT / "recipes" / "quickstart.yaml"
    message = error_of(load_recipe, path, ["train.steps=1.5"])
    assert message.startswith(f"{path}: train.steps: got 1.5") and message.endswith("(set in --set train.steps=1.5)")
    assert "did you mean 'steps'" in error_of(load_recipe, path, ["train.step=3"])


# ------------------------------------------------------------------------ malformed and wrong input
@pytest.mark.parametrize("text, expected", [
    ("name: [unclosed\n", ":2:1: not valid YAML"),
    ("- a\n- b\n", "a recipe must be a YAML mapping, got list"),
    ("", "the recipe file is empty"),
    ("train: {steps: many}\n", "train.steps: got 'many' (str); expected int"),
    ("train: 3\n", "train: expected a mapping"),
    ("optim: {lr: -1.0}\n", "optim.lr: expected > 0"),
    ("optim: {lrr: 1.0}\n", "optim.lrr: unknown option (did you mean 'lr'?)"),
    ("trian: {steps: 3}\n", "trian: unknown option (did you mean 'train'?)"),
    ("model: {backbone: {drop_path: 0.1}}\n",
     "model.backbone.drop_path: unknown option (did you mean 'drop_path_rate'?)"),
    ("model: {backbone: {image_size: 30}}\n", "model.backbone.image_size: height 30 must be a positive multiple"),
    ("head: {name: clasification}\n", "head.name: unknown head 'clasification' (did you mean 'classification'?)"),
    ("head: {options: {num_clases: 3}}\n", "head.options.num_clases: unknown option (did you mean 'num_classes'?)"),
    ("head: {name: mim}\n", "tokenizer.name: the mim head needs a tokenizer"),
    ("head: {name: mim}\ntokenizer: {name: codebok}\n",
     "tokenizer.name: unknown tokenizer 'codebok' (did you mean 'codebook'?)"),
    ("tokenizer: {name: codebook, options: {pth: a}}\n",
     "tokenizer.options.pth: unknown option (did you mean 'path'?)"),
    ("data: {dataset: imagefolder}\n", "data.dataset: unknown dataset 'imagefolder' (did you mean 'image_folder'?)"),
    ("data: {dataset: image_folder}\n", "data.options.root: required option is missing"),
    ("data: {dataset: digits, options: {val_fraction: 2}}\n", "data.options.val_fraction: expected a value in (0, 1)"),
    ("scaling: {num_workers: 0}\n", "scaling.num_workers: expected >= 1"),
    ("scaling: {placement_strategy: SPREAD_OUT}\n", "scaling.placement_strategy: got 'SPREAD_OUT'"),
    ("scaling: {use_gpu: sometimes}\n", "scaling.use_gpu: got 'sometimes'; expected bool or one of 'auto'"),
    ("scaling: {use_gpu: false, resources_per_worker: {GPU: 1}}\n", "scaling.resources_per_worker.GPU: asks for GPUs"),
    ("scaling: {gpu_memory_gb: 0}\n", "scaling.gpu_memory_gb: expected a size in GB > 0"),
    ("scaling: {use_gpu: false}\nengine: {precision: fp16}\n", "engine.precision: fp16 needs GPUs"),
    ("scaling: {num_workers: 4}\ndata: {dataset: digits, batch_size: 8}\nengine: {raw: {train_batch_size: 64}}\n",
     "engine.raw.train_batch_size: is 64, but the recipe implies 32"),
    ("tracking: {experiment: ''}\n", "tracking.experiment: expected a non-empty experiment name"),
    ("scaling: {use_gpu: false}\nengine: {backend: fairscale, fairscale_mode: fsdp}\n",
     "engine.fairscale_mode: fsdp needs GPUs (fairscale's FullyShardedDataParallel is GPU-only)"),
    ("tracking: {enabled: yes please}\n", "tracking.enabled: got 'yes please'"),
    ("optim: {lr: 1" + "0" * 400 + "}\n", "optim.lr: number out of range"),
])
def test_bad_recipes_give_one_line_naming_file_and_field(tmp_path, text, expected):
    path = write(tmp_path / "bad.yaml", text)
    message = error_of(load_recipe, path)
    assert message.startswith(str(path)) and expected in message, message


def test_bad_recipe_through_the_validate_command(tmp_path, capsys):
    good = write(tmp_path / "good.yaml", "name: good\n")
    bad1 = write(tmp_path / "bad1.yaml", "optim: {lrr: 1.0}\n")
    bad2 = write(tmp_path / "bad2.yaml", "key: [\n")
    assert run_validate(str(good), str(bad1), str(bad2)) == 2
    captured = capsys.readouterr()
    assert captured.out.splitlines() == [f"ok: {good}"]
    lines = captured.err.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"error: {bad1}: optim.lrr: unknown option (did you mean 'lr'?)")
    assert lines[1].startswith(f"error: {bad2}:") and "not valid YAML" in lines[1]
    assert run_validate(str(good), "--set", "train.steps=0") == 2
    assert "train.steps: expected > 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- scaling / tracking
def test_scaling_and_tracking_are_typed_with_defaults():
    recipe = parse_recipe({})
    assert recipe.scaling == ScalingSection() and recipe.tracking == TrackingSection()
    scaling = recipe.scaling
    assert (scaling.num_workers, scaling.use_gpu, scaling.placement_strategy) == (1, "auto", "PACK")
    assert (recipe.tracking.enabled, recipe.tracking.uri, recipe.tracking.experiment) == (True, None, "beitdist")
    recipe = parse_recipe({"scaling": {"num_workers": 4, "use_gpu": True, "resources_per_worker": {"CPU": 2, "GPU": 1},
                                       "max_failures": -1, "gpu_memory_gb": 80},
                           "tracking": {"uri": "http://mlflow:5000", "log_images": False}})
    assert recipe.scaling.resources_per_worker == {"CPU": 2.0, "GPU": 1.0} and recipe.scaling.gpu_memory_gb == 80.0
    assert recipe.global_batch == 4 * recipe.data.batch_size
    assert parse_recipe(recipe.to_dict()) == recipe


def test_tar_shard_paths_and_count_against_the_workers(tmp_path):
    for i in range(2):
        with tarfile.open(tmp_path / f"train-{i:03d}.tar", "w"):
            pass
    text = f"""
data:
  dataset: tar_shards
  options: {{num_classes: 3, train: ["{tmp_path}/train-{{000..001}}.tar"]}}
scaling: {{num_workers: 2}}
"""
    path = write(tmp_path / "shards.yaml", text)
    assert path_problems(validate_file(path)) == []
    message = error_of(validate_file, path, ["scaling.num_workers=3"])
    assert "data.options.train: 2 shards for 3 readers" in message
    message = error_of(validate_file, path, [f"data.options.train=[{tmp_path}/nope-*.tar]"])
    assert "data.options.train: shards of" in message and "--skip-paths" in message
    validate_file(path, [f"data.options.train=[{tmp_path}/nope-*.tar]"], check_paths=False)


# ------------------------------------------------------------------------ `python -m beitdist`
def test_python_m_beitdist_validate(tmp_path):
    bad = write(tmp_path / "bad.yaml", "head: {name: clasification}\n")
    good = ROOT / "recipes" / "quickstart.yaml"
    result = subprocess.run([sys.executable, "-m", "beitdist", "validate", str(good), str(bad)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stdout.splitlines() == [f"ok: {good}"]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {bad}: head.name: unknown head 'clasification'")
    result = subprocess.run([sys.executable, "-m", "beitdist", "validate", "--skip-paths", *map(str, RECIPES)],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == len(RECIPES)


# ------------------------------------------------------------------------------ property test
SECTIONS = ["name", "seed", "output_dir", "model", "head", "tokenizer", "data", "optim", "engine", "train",
            "scaling", "tracking"]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8))
keys = st.one_of(st.sampled_from(SECTIONS + ["name", "options", "dataset", "lr", "steps", "num_workers", "backbone"]),
                 st.text(max_size=6), st.integers(-3, 3))
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=4),
                         max_leaves=16)
QUICKSTART = resolve_recipe_file(ROOT / "recipes" / "quickstart_pretrain.yaml")[0]


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, prefix + (key,))


@st.composite
def mutated_recipes(draw):
    doc = copy.deepcopy(QUICKSTART)
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(doc) if p]
        path = draw(st.sampled_from(paths))
        parent = doc
        for key in path[:-1]:
            parent = parent[key]
        action = draw(st.sampled_from(["replace", "delete", "extra"]))
        if action == "replace":
            parent[path[-1]] = draw(documents)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent[path[-1]], dict):
            parent[path[-1]][draw(st.text(min_size=1, max_size=8))] = draw(scalars)
    return doc


def _parses_or_recipe_error(doc) -> None:
    try:
        recipe = parse_recipe(doc, "doc.yaml")
    except RecipeError as err:
        assert str(err).startswith("doc.yaml: ") and len(str(err).splitlines()) == 1, str(err)
    else:
        assert isinstance(recipe, Recipe)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(keys, documents, max_size=6) | documents)
def test_random_documents_only_raise_recipe_error(doc):
    _parses_or_recipe_error(doc)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated_recipes())
def test_mutated_recipes_only_raise_recipe_error(doc):
    _parses_or_recipe_error(doc)


def test_yaml_documents_round_trip_through_the_file_loader(tmp_path):
    path = write(tmp_path / "r.yaml", yaml.safe_dump(QUICKSTART))
    assert load_recipe(path) == parse_recipe(QUICKSTART)


def test_mlflow_tracking_uri_from_the_environment_fills_an_unset_uri():
    from beitdist.recipe import parse_recipe, with_environment

    recipe = parse_recipe({"name": "r"})
    assert with_environment(recipe, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}).tracking.uri == "http://mlflow:5000"
    assert with_environment(recipe, {}).tracking.uri is None
    pinned = parse_recipe({"name": "r", "tracking": {"uri": "sqlite:///x.db"}})
    assert with_environment(pinned, {"MLFLOW_TRACKING_URI": "http://mlflow:5000"}).tracking.uri == "sqlite:///x.db"


def test_pinned_global_batch_derives_grad_accum_per_world_size():
    from beitdist.recipe import RecipeError, parse_recipe

    recipe = parse_recipe({"data": {"dataset": "digits", "batch_size": 8},
                           "scaling": {"num_workers": 2, "global_batch_size": 64}})
    assert recipe.global_batch == 64
    assert [recipe.at_world_size(w).engine.grad_accum for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert recipe.at_world_size(1).scaling.num_workers == 1
    with pytest.raises(RecipeError, match=r"scaling.global_batch_size: 64 is not a multiple of data.batch_size 8 x 16"):
        recipe.at_world_size(16)
    assert parse_recipe({"data": {"dataset": "digits", "batch_size": 8}}).at_world_size(4).engine.grad_accum == 1


@pytest.mark.parametrize("text, expected", [
    ("scaling: {num_workers: 3, global_batch_size: 64}\ndata: {dataset: digits, batch_size: 8}\n",
     "scaling.global_batch_size: 64 is not a multiple of data.batch_size 8 x 3 ranks (scaling.num_workers)"),
    ("scaling: {num_workers: 2, global_batch_size: 64}\ndata: {dataset: digits, batch_size: 8}\nengine: {grad_accum: 2}\n",
     "engine.grad_accum: is 2, but scaling.global_batch_size 64 / (data.batch_size 8 x scaling.num_workers 2) gives 4"),
    ("scaling: {global_batch_size: 0}\n", "scaling.global_batch_size: expected >= 1"),
])
def test_pinned_global_batch_errors(tmp_path, text, expected):
    path = write(tmp_path / "bad.yaml", text)
    message = error_of(load_recipe, path)
    assert message.startswith(str(path)) and expected in message, message


def test_engine_raw_batch_sizes_are_checked_against_a_pinned_global_batch():
    from beitdist.recipe import parse_recipe

    base = {"data": {"dataset": "digits", "batch_size": 8}, "scaling": {"num_workers": 2, "global_batch_size": 64}}
    parse_recipe({**base, "engine": {"raw": {"train_batch_size": 64, "gradient_accumulation_steps": 4}}})
    with pytest.raises(ValueError, match=r"engine.raw.train_batch_size: is 16, but the recipe implies 64"):
        parse_recipe({**base, "engine": {"raw": {"train_batch_size": 16}}})
