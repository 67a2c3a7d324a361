"""beitdist against transformers' Data2VecVision* (data2vec-vision, arXiv 2202.03555: BEiT's encoder
pretrained another way): random weights saved with `save_pretrained` load with the same outputs
(<= 1e-4), and `export_hf(..., model_type="data2vec-vision")` writes back exactly the tensors
transformers wrote, which its Data2VecVision classes load with no missing or unexpected keys."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

import beitdist  # noqa: E402
from beitdist.backbone.convert import CheckpointError  # noqa: E402
from beitdist.cli import main  # noqa: E402
from tests.conftest import hf_config, randomize_, save_hf  # noqa: E402
from tests.test_parity_transformers import _assert_clean, _assert_same_files, _load_info  # noqa: E402

TOL = 1e-4
CASES = {
    "per_block": dict(use_relative_position_bias=True),
    "shared_cls_pooling": dict(use_shared_relative_position_bias=True, use_mean_pooling=False),
    "abs_no_layer_scale": dict(use_absolute_position_embeddings=True, layer_scale_init_value=0.0),
}


def d2v_config(**overrides):
    beit = hf_config(**overrides).to_dict()
    for key in ("model_type", "architectures", "transformers_version", "vocab_size"):
        beit.pop(key, None)
    return transformers.Data2VecVisionConfig(**beit)


def _pixels(config, batch=2, seed=3):
    return torch.randn(batch, 3, config.image_size, config.image_size, generator=torch.Generator().manual_seed(seed))


def _reload_clean(cls, directory):
    model, info = _load_info(cls, directory)
    _assert_clean(info)
    return model


@pytest.mark.parametrize("case", sorted(CASES))
def test_model_hidden_states_pooler_and_round_trip(case, tmp_path):
    config = d2v_config(**CASES[case])
    reference = randomize_(transformers.Data2VecVisionModel(config))
    model = beitdist.load_model(save_hf(reference, tmp_path / "hf")).eval()
    pixels = _pixels(config)
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True)
        got = model(pixels, output_hidden_states=True)
    torch.testing.assert_close(got.last_hidden_state, expected.last_hidden_state, atol=TOL, rtol=0)
    if expected.pooler_output is not None:  # Data2VecVisionModel builds no pooler unless asked
        torch.testing.assert_close(got.pooler_output, expected.pooler_output, atol=TOL, rtol=0)
    for mine, theirs in zip(got.hidden_states, expected.hidden_states, strict=True):
        torch.testing.assert_close(mine, theirs, atol=TOL, rtol=0)

    beitdist.export_hf(model, tmp_path / "exported", model_type="data2vec-vision")
    _assert_same_files(tmp_path / "hf", tmp_path / "exported")
    written = json.loads((tmp_path / "exported" / "config.json").read_text())
    assert written["model_type"] == "data2vec-vision" and written["architectures"] == ["Data2VecVisionModel"]
    again = _reload_clean(transformers.Data2VecVisionModel, tmp_path / "exported")
    assert isinstance(again.config, transformers.Data2VecVisionConfig)
    with torch.no_grad():
        torch.testing.assert_close(again(pixels).last_hidden_state, got.last_hidden_state, atol=TOL, rtol=0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_classification_logits_and_round_trip(case, tmp_path):
    config = d2v_config(**CASES[case])
    reference = randomize_(transformers.Data2VecVisionForImageClassification(config))
    model = beitdist.load_model(save_hf(reference, tmp_path / "hf"), head="auto").eval()
    assert model.head_name == "classification" and model.head.options()["num_classes"] == config.num_labels
    pixels = _pixels(config)
    with torch.no_grad():
        expected, got = reference(pixels).logits, model(pixels).logits
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)

    # the command line too: convert --to data2vec-vision
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "exported"), "--to", "data2vec-vision"]) == 0
    _assert_same_files(tmp_path / "hf", tmp_path / "exported")
    again = _reload_clean(transformers.Data2VecVisionForImageClassification, tmp_path / "exported")
    with torch.no_grad():
        torch.testing.assert_close(again(pixels).logits, got, atol=TOL, rtol=0)
    # and as BEiT: the same encoder, so transformers' Beit classes take it as well
    beitdist.export_hf(model, tmp_path / "as_beit")
    beit = _reload_clean(transformers.BeitForImageClassification, tmp_path / "as_beit")
    with torch.no_grad():
        torch.testing.assert_close(beit(pixels).logits, got, atol=TOL, rtol=0)


@pytest.mark.parametrize("extra", [{}, dict(auxiliary_concat_input=True, auxiliary_num_convs=2, pool_scales=[1, 2])])
def test_segmentation_logits_and_round_trip(extra, tmp_path):
    config = d2v_config(num_hidden_layers=5, out_indices=[2, 3, 4, 5], use_relative_position_bias=True,
                        auxiliary_channels=16, **extra)
    reference = randomize_(transformers.Data2VecVisionForSemanticSegmentation(config))
    model = beitdist.load_model(save_hf(reference, tmp_path / "hf"), head="auto").eval()
    assert model.head_name == "segmentation"
    pixels = _pixels(config)
    with torch.no_grad():
        expected, got = reference(pixels).logits, model(pixels).logits
    torch.testing.assert_close(got, expected, atol=TOL, rtol=0)
    beitdist.export_hf(model, tmp_path / "exported", model_type="data2vec-vision")
    _assert_same_files(tmp_path / "hf", tmp_path / "exported")
    again = _reload_clean(transformers.Data2VecVisionForSemanticSegmentation, tmp_path / "exported")
    with torch.no_grad():
        torch.testing.assert_close(again(pixels).logits, got, atol=TOL, rtol=0)


def test_damaged_files_and_heads_without_a_data2vec_model_are_refused(tmp_path, capsys):
    config = d2v_config(use_relative_position_bias=True)
    reference = randomize_(transformers.Data2VecVisionForImageClassification(config))
    save_hf(reference, tmp_path / "hf")
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del state["data2vec_vision.encoder.layer.1.attention.attention.query.weight"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file(state, str(tmp_path / "broken" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="layer 1: missing attention weights"):
        beitdist.load_model(tmp_path / "broken")

    mim = beitdist.load_model(save_hf(randomize_(transformers.BeitForMaskedImageModeling(
        hf_config(use_mask_token=True, use_shared_relative_position_bias=True))), tmp_path / "mim"), head="mim")
    with pytest.raises(CheckpointError, match="no Data2VecVision model for BeitForMaskedImageModeling"):
        beitdist.export_hf(mim, tmp_path / "mim_d2v", model_type="data2vec-vision")
    assert not (tmp_path / "mim_d2v").exists()
    assert main(["convert", str(tmp_path / "mim"), str(tmp_path / "mim_d2v"), "--to", "data2vec-vision"]) == 2
    assert "no Data2VecVision model" in capsys.readouterr().err
