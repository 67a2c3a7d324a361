"""`engine.compile: true` (torch.compile under DeepSpeed's own `engine.compile`) trains exactly as
the eager model does: the same losses, metrics and final weights, and the same parameter names."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from tests.distributed import TINY_RECIPE, merge, result_of, run_recipe

pytestmark = pytest.mark.slow


def test_compiled_training_matches_eager(tmp_path):
    # one block keeps inductor's compile time (train forward/backward, eval forward) under a minute
    base = merge(TINY_RECIPE, {"model": {"backbone": {"depth": 1}}, "train": {"steps": 3}})
    eager = merge(base, {"name": "eager"})
    compiled = merge(base, {"name": "compiled", "engine": {"compile": True}})
    run_recipe(eager, tmp_path, nproc=1)
    out = run_recipe(compiled, tmp_path, nproc=1, timeout=600)
    assert "model compiled (torch.compile" in out.stderr
    a, b = result_of(eager, tmp_path), result_of(compiled, tmp_path)
    assert b["losses"] == pytest.approx(a["losses"], abs=1e-5)
    assert b["metrics"] == pytest.approx(a["metrics"], abs=1e-5)
    wa = load_file(str(tmp_path / "runs/eager/final/model.safetensors"))
    wb = load_file(str(tmp_path / "runs/compiled/final/model.safetensors"))
    assert sorted(wa) == sorted(wb)  # no _orig_mod. prefixes
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-5, rtol=1e-4, msg=key)
