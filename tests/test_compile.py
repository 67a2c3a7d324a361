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


def test_mim_training_compiles_as_one_graph():
    """In training mode the MIM head selects the masked patches (a data-dependent shape) only when
    not compiling: a compiled pretraining step stays one graph, with the loss's numbers unchanged."""
    import torch._dynamo

    import beitdist
    from beitdist.backbone.config import BackboneConfig

    config = BackboneConfig(embed_dim=32, depth=2, num_heads=2, image_size=32, patch_size=8, drop_path_rate=0.0)
    model = beitdist.build_model(config, "mim", {"vocab_size": 20}).train()
    pixels, mask = torch.randn(2, 3, 32, 32), torch.rand(2, 16, generator=torch.Generator().manual_seed(0)) < 0.4
    explained = torch._dynamo.explain(model)(pixels, mask)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
    batch = {"bool_masked_pos": mask, "labels": torch.randint(0, 20, (2, 16))}
    compiled = torch.compile(model, backend="eager")
    torch.testing.assert_close(model.head.loss(compiled(pixels, mask), batch), model.head.loss(model(pixels, mask), batch))
