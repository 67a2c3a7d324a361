"""BEiT v2's VQ-KD tokenizer read from a unilm checkpoint built here by hand (unilm's key names:
`encoder.*` a ViT with absolute positions and a mean-pooling norm, `encode_task_layer.*`,
`quantize.embedding.weight`, plus the decoder and quantizer buffers it does not need): tokens
equal a hand computation, are deterministic, and bad files are one clear error."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from beitdist import plugins
from beitdist.backbone.beit import Beit
from beitdist.backbone.config import BackboneConfig
from beitdist.backbone.convert import CheckpointError
from beitdist.errors import InputError

ENCODER = BackboneConfig(embed_dim=32, depth=2, num_heads=2, image_size=(32, 32), patch_size=8, rel_pos_bias="none",
                         abs_pos_emb=True, pooling="mean", layer_scale_init=0.0)


def _vqkd_checkpoint(path, codes=16, code_dim=8, seed=0):
    """What unilm's `torch.save({"model": vqkd.state_dict(), ...})` holds, with random weights."""
    torch.manual_seed(seed)
    encoder = Beit(ENCODER)
    state = {f"encoder.{k}": v for k, v in encoder.state_dict().items()}
    task = torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Tanh(), torch.nn.Linear(32, code_dim))
    state.update({f"encode_task_layer.{k}": v for k, v in task.state_dict().items()})
    codebook = F.normalize(torch.randn(codes, code_dim), dim=-1)
    state["quantize.embedding.weight"] = codebook
    state["quantize.embedding.cluster_size"] = torch.ones(codes)
    state["quantize.embedding.embed_avg"] = codebook.clone()
    state["quantize.embedding.initted"] = torch.tensor([True])
    state["quantize.cluster_size"] = torch.ones(codes)
    state["decoder.blocks.0.norm1.weight"] = torch.ones(32)
    state["decode_task_layer.0.weight"] = torch.randn(32, 32)
    torch.save({"model": state, "epoch": 99}, path)
    return encoder.eval(), task.eval(), codebook


def _images(n=4, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_tokens_equal_a_hand_computation_and_are_deterministic(tmp_path):
    encoder, task, codebook = _vqkd_checkpoint(tmp_path / "vqkd.pth")
    tokenizer = plugins.tokenizer_class("vqkd")({"path": str(tmp_path / "vqkd.pth"), "input_size": 32,
                                                 "num_heads": 2})
    images = _images()
    with torch.no_grad():
        x = images * 2 - 1  # unilm's "default" process: [0, 1] -> [-1, 1]
        patches = encoder.fc_norm(encoder(x).last_hidden_state[:, 1:])
        z = F.normalize(task(patches), dim=-1)
        expected = torch.cdist(z, codebook.expand(4, -1, -1)).argmin(dim=-1)  # nearest code, l2
    tokens = tokenizer.encode(images)
    assert tokens.shape == (4, 16) and tokens.dtype == torch.long
    assert torch.equal(tokens, expected)
    assert torch.equal(tokenizer.encode(images), tokens)
    assert tokenizer.vocab_size == 16 and tokenizer.input_size == 32
    assert len(set(tokens.flatten().tolist())) > 1


def test_bad_vqkd_files_and_options_are_one_clear_error(tmp_path):
    cls = plugins.tokenizer_class("vqkd")
    with pytest.raises(InputError, match="no such VQ-KD checkpoint"):
        cls({"path": str(tmp_path / "missing.pth")})
    _vqkd_checkpoint(tmp_path / "vqkd.pth")
    with pytest.raises(InputError, match="input_size: 224, but the VQ-KD encoder .* was trained at 32 px"):
        cls({"path": str(tmp_path / "vqkd.pth"), "num_heads": 2})
    state = torch.load(tmp_path / "vqkd.pth")["model"]
    del state["quantize.embedding.weight"]
    torch.save({"model": state}, tmp_path / "no_codebook.pth")
    with pytest.raises(CheckpointError, match=r"not a VQ-KD checkpoint \(missing quantize.embedding.weight\)"):
        cls({"path": str(tmp_path / "no_codebook.pth"), "input_size": 32})
    torch.save({"model": {"blocks.0.norm1.weight": torch.ones(3)}}, tmp_path / "beit.pth")
    with pytest.raises(CheckpointError, match="unexpected keys"):
        cls({"path": str(tmp_path / "beit.pth"), "input_size": 32})


def test_export_vqkd_never_replaces_what_is_not_a_vqkd_file(tmp_path):
    """`export_vqkd` writes a new file, or replaces a VQ-KD file with overwrite=True; the source
    checkpoint, a directory or any other file at OUT are refused and left as they were."""
    from beitdist.checkpoint import save_checkpoint
    from beitdist.heads.vqkd import export_vqkd, is_vqkd_file
    from beitdist.model import build_model
    from beitdist.output_paths import OutputError

    config = ENCODER.replace(rel_pos_bias="per_block", abs_pos_emb=False)
    model = build_model(config, "vqkd_training", {"teacher": "unused", "teacher_dim": 32, "num_codes": 16,
                                                  "code_dim": 8, "decoder_depth": 1})
    source = save_checkpoint(model, tmp_path / "trained")
    weights = (source / "model.safetensors").read_bytes()
    other = tmp_path / "notes.safetensors"
    other.write_bytes(b"not a tokenizer")
    for out in (other, source, source / "model.safetensors", tmp_path / "a_dir"):
        (tmp_path / "a_dir").mkdir(exist_ok=True)
        with pytest.raises(OutputError):
            export_vqkd(source, out)
    assert other.read_bytes() == b"not a tokenizer" and (source / "model.safetensors").read_bytes() == weights
    out = export_vqkd(source, tmp_path / "tok.safetensors")
    assert is_vqkd_file(out)
    with pytest.raises(OutputError, match="--overwrite|overwrite"):
        export_vqkd(source, out)
    assert export_vqkd(source, out, overwrite=True) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_dir", "notes.safetensors", "tok.safetensors", "trained"]
    tokens = plugins.tokenizer_class("vqkd")({"path": str(out), "input_size": 32}).encode(_images())
    assert tokens.shape == (4, 16) and int(tokens.max()) < 16


def test_an_exported_tokenizer_picks_the_codes_its_training_head_picks(tmp_path):
    """An encoder without a relative-position table holds its head count nowhere in its weights: the
    export records it, so the tokenizer runs the attention the head was trained with (4 heads here,
    where unilm's guess of embed_dim // 64 would give 1) and picks the very codes the head picks."""
    from beitdist.checkpoint import save_checkpoint
    from beitdist.heads.vqkd import export_vqkd
    from beitdist.model import build_model

    config = ENCODER.replace(num_heads=4)
    torch.manual_seed(0)
    model = build_model(config, "vqkd_training", {"teacher": "unused", "teacher_dim": 32, "num_codes": 16,
                                                  "code_dim": 8, "decoder_depth": 1}).eval()
    path = export_vqkd(save_checkpoint(model, tmp_path / "trained"), tmp_path / "tok.safetensors")
    tokenizer = plugins.tokenizer_class("vqkd")({"path": str(path), "input_size": 32})
    assert tokenizer.encoder.config.num_heads == 4
    images = _images(8)
    with torch.no_grad():
        features = model.backbone(images * 2 - 1).last_hidden_state[:, 1:]
        z = model.head.encode_task_layer(model.head.encoder_norm(features))
        expected = model.head.quantize.lookup(z.reshape(-1, 8)).reshape(8, 16)
    assert torch.equal(tokenizer.encode(images), expected)
