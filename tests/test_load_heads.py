"""Loading never drops trained head weights by surprise: a plain `torch.save(model.state_dict())`
of any built-in (or plugin) head loads back with head="auto" as that head, naming the same head
loads its weights, and a new head in place of the trained one needs head_options / new_head and
is logged at WARNING."""

from __future__ import annotations

import logging

import pytest
import torch

import beitdist
from beitdist import plugins
from beitdist.backbone.convert import CheckpointError
from beitdist.cli import main

CFG = beitdist.BackboneConfig(embed_dim=32, depth=2, num_heads=4, image_size=32, patch_size=8)
HEADS = {
    "classification": ({"num_classes": 3}, CFG),
    "mim": ({"vocab_size": 16}, CFG.replace(use_mask_token=True)),
    "segmentation": ({"num_classes": 5, "channels": 32}, CFG),
}


def _plain(tmp_path, head: str) -> tuple[beitdist.BeitForTask, str]:
    options, config = HEADS[head]
    torch.manual_seed(0)
    model = beitdist.build_model(config, head, options).eval()
    with torch.no_grad():
        for p in model.head.parameters():
            p.add_(torch.randn_like(p))  # "trained": nothing like a fresh init
    path = str(tmp_path / f"{head}.pth")
    torch.save(model.state_dict(), path)
    return model, path


@pytest.mark.parametrize("head", sorted(HEADS))
def test_a_plain_state_dict_loads_its_own_head(tmp_path, head):
    model, path = _plain(tmp_path, head)
    pixels = torch.randn(2, 3, 32, 32)
    for asked in ("auto", head):
        loaded = beitdist.load_model(path, head=asked)
        assert loaded.head_name == head
        torch.testing.assert_close(loaded.state_dict(), model.state_dict(), rtol=0, atol=0)
        torch.testing.assert_close(loaded(pixels).logits, model(pixels).logits, rtol=0, atol=0)


def test_replacing_a_trained_head_needs_asking_and_warns(tmp_path, caplog):
    model, path = _plain(tmp_path, "classification")
    with caplog.at_level(logging.WARNING, logger="beitdist.checkpoint"):
        bigger = beitdist.load_model(path, head="classification", head_options={"num_classes": 7})
    assert bigger.head.options()["num_classes"] == 7
    assert any("replacing the checkpoint's trained 'classification' head" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="beitdist.checkpoint"):
        fresh = beitdist.load_model(path, head="classification", new_head=True)
    assert not torch.equal(fresh.head.classifier.weight, model.head.classifier.weight)
    assert any("new_head=True" in r.getMessage() for r in caplog.records)
    same = beitdist.load_model(path, head="classification", head_options={"num_classes": 3})
    assert torch.equal(same.head.classifier.weight, model.head.classifier.weight)  # same shape: kept


def test_a_plugin_head_is_recognised_from_its_shapes(tmp_path):
    from tests.test_plugins import TokenCountHead

    class Recognisable(TokenCountHead):
        name = "token_count_plain"

        @classmethod
        def options_from_state_dict(cls, state):
            return {"num_classes": state["head.fc.weight"].shape[0]}

    module = type("P", (), {"beitdist_register_heads": staticmethod(beitdist.hookimpl(
        lambda registry: registry.add(Recognisable)))})()
    name = plugins.register(module, name="recognisable")
    try:
        model = beitdist.build_model(CFG, "token_count_plain", {"num_classes": 6})
        torch.save(model.state_dict(), tmp_path / "plugin.pth")
        loaded = beitdist.load_model(tmp_path / "plugin.pth", head="auto")
        assert loaded.head_name == "token_count_plain" and loaded.head.options()["num_classes"] == 6
    finally:
        plugins.unregister(name)
    with pytest.raises(CheckpointError, match="no installed head recognises"):
        beitdist.load_model(tmp_path / "plugin.pth", head="auto")
    assert beitdist.load_model(tmp_path / "plugin.pth", head=None).head is None  # backbone alone, as asked


def test_cli_head_options(tmp_path, capsys):
    _, path = _plain(tmp_path, "classification")
    assert main(["convert", path, str(tmp_path / "out"), "--to", "beitdist", "--head-option", "num_classes=7"]) == 0
    assert beitdist.load_model(tmp_path / "out", head="auto").head.options()["num_classes"] == 7
    assert main(["convert", path, str(tmp_path / "bad"), "--head-option", "num_classes"]) == 2
    assert "--head-option 'num_classes': expected KEY.PATH=VALUE" in capsys.readouterr().err
