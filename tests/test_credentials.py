"""Credentials in a recipe (object-store keys, URL passwords) are used but never recorded:
checkpoints, MLflow params and `recipe.yaml` get `<redacted>`, and a recorded recipe read back
drops the placeholders instead of sending them to the store as a key."""

from __future__ import annotations

import json

from beitdist.credentials import REDACTED, redact_url, redacted, without_redacted
from beitdist.recipe import parse_recipe
from beitdist.run.checkpoints import commit_checkpoint, run_recipe
from beitdist.tracking import flatten

SECRET = "s3cr3t-never-recorded"

RECIPE = {
    "name": "creds",
    "output_dir": "s3://bucket/runs",
    "storage": {"options": {"endpoint_url": "http://127.0.0.1:9000", "key": "AKID-EXAMPLE", "secret": SECRET,
                            "client_kwargs": {"region_name": "us-east-1", "aws_session_token": SECRET}}},
    "tracking": {"uri": f"https://alice:{SECRET}@mlflow.example.com/"},
    "data": {"dataset": "tar_shards", "options": {"num_classes": 10, "train": ["s3://bucket/shard-0.tar"],
                                                  "storage_options": {"token": SECRET, "anon": False}}},
}


def test_the_recorded_recipe_holds_no_credential_and_keeps_everything_else():
    recipe = parse_recipe(RECIPE, plugins=False)
    record = recipe.to_record()
    assert SECRET not in json.dumps(record)
    assert SECRET in json.dumps(recipe.to_dict())  # the run itself still has them
    options = record["storage"]["options"]
    assert options == {"endpoint_url": "http://127.0.0.1:9000", "key": REDACTED, "secret": REDACTED,
                       "client_kwargs": {"region_name": "us-east-1", "aws_session_token": REDACTED}}
    assert record["data"]["options"]["storage_options"] == {"token": REDACTED, "anon": False}
    assert record["tracking"]["uri"] == "https://alice:***@mlflow.example.com/"
    # names that only look like credentials outside store options are left alone
    assert record["head"] == recipe.to_dict()["head"]
    assert record["model"] == recipe.to_dict()["model"]
    assert not any(SECRET in str(v) for v in flatten(record).values())


def test_a_recorded_recipe_read_back_drops_the_placeholders(tmp_path):
    record = parse_recipe(RECIPE, plugins=False).to_record()
    tag = tmp_path / "checkpoints" / "step_1"
    tag.mkdir(parents=True)
    (tag / "beitdist_state.json").write_text(json.dumps({"step": 1, "recipe": record}))
    commit_checkpoint(tmp_path / "checkpoints", "step_1", 1)
    back = run_recipe(tmp_path)
    assert back is not None
    assert back["storage"]["options"] == {"endpoint_url": "http://127.0.0.1:9000",
                                          "client_kwargs": {"region_name": "us-east-1"}}
    assert back["data"]["options"]["storage_options"] == {"anon": False}
    assert REDACTED not in json.dumps(back)
    parse_recipe(back, plugins=False)  # still a valid recipe


def test_redaction_edge_cases():
    assert redact_url("sqlite:///runs/mlflow.db") == "sqlite:///runs/mlflow.db"
    assert redact_url("http://user@host:5000") == "http://user@host:5000"
    assert redact_url("postgresql://u:pw@db:5432/mlflow") == "postgresql://u:***@db:5432/mlflow"
    assert redact_url("http://[::1") == "http://[::1"  # not a URL: unchanged, no error
    assert redacted({"storage": {"options": {"key": None, "secret": ""}}}) == \
        {"storage": {"options": {"key": None, "secret": ""}}}  # nothing to hide, nothing changed
    assert without_redacted({"a": [REDACTED, {"b": REDACTED, "c": 1}]}) == {"a": [REDACTED, {"c": 1}]}


def test_ray_keeps_only_the_redacted_recipe_in_its_train_state():
    """`train_loop_config` is Ray Train's recorded state (dashboard, exported events): it holds the
    record; the workers get the whole recipe from the object store."""
    import ray

    from beitdist.launcher import worker_config

    recipe = parse_recipe(RECIPE, plugins=False)
    ray.init(num_cpus=1, include_dashboard=False, logging_level="ERROR", configure_logging=False)
    try:
        config = worker_config(recipe, use_gpu=False)
        assert SECRET not in json.dumps({k: v for k, v in config.items() if k != "recipe_ref"})
        assert ray.get(config["recipe_ref"]) == recipe.to_dict()
        plain = worker_config(parse_recipe({"name": "plain"}, plugins=False), use_gpu=False)
        assert plain["recipe_ref"] is None  # nothing to hide: nothing extra in the object store
    finally:
        ray.shutdown()
