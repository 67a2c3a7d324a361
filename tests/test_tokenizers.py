"""Visual tokenizers: the DALL-E dVAE encoder (loading rules, architecture, map_pixels) and the
offline k-means codebook (fit, file format, determinism, information, CLI)."""

from __future__ import annotations

import argparse
import hashlib
import sys
import types
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file

from beitdist import plugins
from beitdist.schema import OptionsError
from beitdist.tokenizers.base import contract_problems
from beitdist.tokenizers.codebook import CodebookTokenizer, load_codebook, patchify, save_codebook
from beitdist.tokenizers.dalle import DalleEncoder, DalleTokenizer, map_pixels
from beitdist.tokenizers.fit import add_tokenizer_cli, fit_codebook, load_digits_images

OURS = ("beitdist.tokenizers.dalle", "beitdist.tokenizers.codebook")
SIZE, PATCH = 32, 8  # digits at 32 px: a 4x4 token grid


@pytest.fixture(autouse=True)
def registered(monkeypatch):
    extra = tuple(m for m in OURS if m not in plugins.BUILTIN_PLUGINS)
    monkeypatch.setattr(plugins, "BUILTIN_PLUGINS", tuple(plugins.BUILTIN_PLUGINS) + extra)
    plugins.reset()
    assert plugins.tokenizer_class("codebook") is CodebookTokenizer
    yield
    plugins.reset()


# ------------------------------------------------------------------------ DALL-E
def tiny_encoder(seed: int = 0, n_blk: int = 1) -> DalleEncoder:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        encoder = DalleEncoder(n_hid=8, n_blk_per_group=n_blk, vocab_size=16)
        for name, p in encoder.named_parameters():
            if name.endswith(".b"):
                p.data.normal_(0, 0.1)  # zero biases would hide a missing map_pixels shift
    return encoder.eval()


def reference_logits(state: dict, x: torch.Tensor, n_blk: int) -> torch.Tensor:
    """DALL-E's encoder written out functionally from its source, independent of DalleEncoder."""

    def conv(h, name):
        w = state[f"{name}.w"]
        return F.conv2d(h, w, state[f"{name}.b"], padding=(w.shape[-1] - 1) // 2)

    gain = 1 / (4 * n_blk) ** 2
    x = conv(x, "blocks.input")
    for g in range(1, 5):
        for i in range(1, n_blk + 1):
            prefix = f"blocks.group_{g}.block_{i}"
            h = x
            for j in range(1, 5):
                h = conv(F.relu(h), f"{prefix}.res_path.conv_{j}")
            x = (conv(x, f"{prefix}.id_path") if f"{prefix}.id_path.w" in state else x) + gain * h
        if g < 4:
            x = F.max_pool2d(x, 2)
    return conv(F.relu(x), "blocks.output.conv")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_published_encoder_layout():
    with torch.device("meta"):
        state = DalleEncoder().state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    assert len(shapes) == 74
    assert shapes["blocks.input.w"] == (256, 3, 7, 7)
    assert shapes["blocks.group_1.block_1.res_path.conv_1.w"] == (64, 256, 3, 3)
    assert shapes["blocks.group_2.block_1.id_path.w"] == (512, 256, 1, 1)
    assert "blocks.group_2.block_2.id_path.w" not in shapes and "blocks.group_1.block_1.id_path.w" not in shapes
    assert shapes["blocks.group_4.block_2.res_path.conv_4.w"] == (2048, 512, 1, 1)
    assert shapes["blocks.output.conv.w"] == (8192, 2048, 1, 1)
    with torch.device("meta"):
        blocks = [m for m in DalleEncoder().modules() if hasattr(m, "post_gain")]
    assert len(blocks) == 8 and all(b.post_gain == 1 / 64 for b in blocks)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_state_dict_files_load_without_trust(tmp_path, suffix):
    encoder = tiny_encoder()
    path = tmp_path / f"encoder{suffix}"
    if suffix == ".pt":
        torch.save(encoder.state_dict(), path)
    else:
        save_file(encoder.state_dict(), path)
    tokenizer = plugins.tokenizer_class("dalle")({"path": str(path)})
    assert contract_problems(DalleTokenizer) == []
    assert (tokenizer.vocab_size, tokenizer.input_size) == (16, 112)
    images = torch.rand(3, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    ids = tokenizer.encode(images)
    assert ids.shape == (3, 196) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 16
    assert not any(p.requires_grad for p in tokenizer.parameters())
    pinned = DalleTokenizer({"path": str(path), "sha256": sha256(path)})  # a hash may pin plain files too
    assert torch.equal(pinned.encode(images), ids)


@pytest.mark.parametrize("n_blk", [1, 2])
def test_encode_is_argmax_of_dalle_logits_on_mapped_pixels(tmp_path, n_blk):
    encoder = tiny_encoder(seed=n_blk, n_blk=n_blk)
    state = encoder.state_dict()
    torch.save(state, tmp_path / "e.pt")
    tokenizer = DalleTokenizer({"path": str(tmp_path / "e.pt"), "input_size": 32})
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = reference_logits(state, x * 0.8 + 0.1, n_blk)
    torch.testing.assert_close(tokenizer.encoder(map_pixels(x)), expected, rtol=1e-4, atol=1e-5)
    ids = tokenizer.encode(x)
    assert ids.shape == (4, 16)
    assert torch.equal(ids, expected.argmax(1).flatten(1))  # row-major over the 4x4 grid
    assert not torch.equal(ids, reference_logits(state, x, n_blk).argmax(1).flatten(1))


def test_pickled_module_needs_a_hash_or_trust(tmp_path):
    encoder = tiny_encoder()
    pkl = tmp_path / "encoder.pkl"
    torch.save(encoder, pkl)
    digest = sha256(pkl)
    with pytest.raises(ValueError) as err:
        DalleTokenizer({"path": str(pkl)})
    message = str(err.value)
    assert str(pkl) in message and f"sha256: {digest}" in message and "trust: true" in message
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2))
    want = reference_logits(encoder.state_dict(), map_pixels(x), 1).argmax(1).flatten(1)
    for options in ({"sha256": digest}, {"sha256": digest.upper()}, {"trust": True}):
        tokenizer = DalleTokenizer({"path": str(pkl), **options})
        assert type(tokenizer.encoder) is DalleEncoder
        assert torch.equal(tokenizer.encode(x), want)
    wrong = "0" * 64
    with pytest.raises(ValueError, match=f"sha256 is {digest}, but tokenizer.options.sha256 says {wrong}"):
        DalleTokenizer({"path": str(pkl), "sha256": wrong})


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_refusal_runs_no_pickled_code(tmp_path):
    marker, pkl = tmp_path / "pwned", tmp_path / "evil.pkl"
    torch.save({"blocks.input.w": _Payload(marker)}, pkl)
    with pytest.raises(ValueError, match="pickled module"):
        DalleTokenizer({"path": str(pkl)})
    assert not marker.exists()


def test_published_pickle_loads_without_the_dall_e_package(tmp_path, monkeypatch):
    """encoder.pkl references dall_e.encoder.Encoder etc.; those are mapped to a stand-in."""
    encoder = tiny_encoder()
    pkg, enc_mod, utils_mod = (types.ModuleType(n) for n in ("dall_e", "dall_e.encoder", "dall_e.utils"))
    fakes = {}
    for module, name in ((enc_mod, "Encoder"), (enc_mod, "EncoderBlock"), (utils_mod, "Conv2d")):
        fakes[name] = type(name, (torch.nn.Module,), {"__module__": module.__name__, "__qualname__": name})
        setattr(module, name, fakes[name])
    for module in (pkg, enc_mod, utils_mod):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    for module in encoder.modules():
        kind = {DalleEncoder: "Encoder", type(encoder.blocks.group_1.block_1): "EncoderBlock",
                type(encoder.blocks.input): "Conv2d"}.get(type(module))
        if kind:
            module.__class__ = fakes[kind]
    pkl = tmp_path / "encoder.pkl"
    torch.save(encoder, pkl)
    with zipfile.ZipFile(pkl) as archive:
        pickled = b"".join(archive.read(n) for n in archive.namelist() if n.endswith(".pkl"))
    assert b"dall_e.encoder" in pickled and b"dall_e.utils" in pickled
    for module in (pkg, enc_mod, utils_mod):
        monkeypatch.delitem(sys.modules, module.__name__)
    tokenizer = DalleTokenizer({"path": str(pkl), "trust": True})
    for key, value in encoder.state_dict().items():
        assert torch.equal(tokenizer.encoder.state_dict()[key], value)


def test_dalle_errors_name_the_path_and_what_is_allowed(tmp_path):
    with pytest.raises(ValueError, match=r"nowhere\.pkl: DALL-E encoder file not found"):
        DalleTokenizer({"path": str(tmp_path / "nowhere.pkl")})
    other = tmp_path / "other.pt"
    torch.save({"weight": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=r"other\.pt: not a DALL-E dVAE encoder state dict"):
        DalleTokenizer({"path": str(other)})
    state = tiny_encoder().state_dict()
    state.pop("blocks.group_3.block_1.res_path.conv_2.w")
    state["blocks.extra.w"] = torch.zeros(1)
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(ValueError, match=r"broken\.pt: does not match .*conv_2\.w.*blocks\.extra\.w"):
        DalleTokenizer({"path": str(tmp_path / "broken.pt")})
    with pytest.raises(OptionsError, match="tokenizer.options.sha256: expected 64 hex digits"):
        DalleTokenizer({"path": "x", "sha256": "abc"})
    with pytest.raises(OptionsError, match="tokenizer.options.input_size: expected a positive multiple of 8"):
        DalleTokenizer({"path": "x", "input_size": 100})
    torch.save(tiny_encoder().state_dict(), tmp_path / "ok.pt")
    with pytest.raises(ValueError, match=r"expects images \(B, 3, 112, 112\)"):
        DalleTokenizer({"path": str(tmp_path / "ok.pt")}).encode(torch.rand(1, 3, 64, 64))


# ---------------------------------------------------------------------- codebook
@pytest.fixture(scope="module")
def digits():
    return load_digits_images(SIZE)


@pytest.fixture(scope="module")
def codebook16(digits, tmp_path_factory):
    images, _ = digits
    return fit_codebook(images[:600], tmp_path_factory.mktemp("cb") / "digits16.safetensors",
                        vocab_size=16, patch_size=PATCH, input_size=SIZE, seed=0)


def test_codebook_file_round_trips(codebook16):
    raw = load_file(codebook16)
    assert set(raw) == {"centroids", "patch_size", "input_size", "feature", "mean", "std", "eps"}
    assert raw["centroids"].shape == (16, 3 * PATCH * PATCH) and raw["centroids"].dtype == torch.float32
    book = load_codebook(codebook16)
    assert (book.vocab_size, book.patch_size, book.input_size, book.feature) == (16, PATCH, SIZE, "pixels")
    copy = save_codebook(book, codebook16.parent / "copy.safetensors")
    assert load_file(copy).keys() == raw.keys()
    assert all(torch.equal(load_file(copy)[k], raw[k]) for k in raw)
    assert [p.name for p in codebook16.parent.iterdir() if p.name.startswith(".")] == []  # no temp files left


def test_codebook_tokens_are_deterministic_and_in_range(digits, codebook16, tmp_path):
    images, _ = digits
    again = fit_codebook(images[:600], tmp_path / "again.safetensors", vocab_size=16, patch_size=PATCH, input_size=SIZE, seed=0)
    other = fit_codebook(images[:600], tmp_path / "other.safetensors", vocab_size=16, patch_size=PATCH, input_size=SIZE, seed=1)
    assert torch.equal(load_file(again)["centroids"], load_file(codebook16)["centroids"])
    assert not torch.equal(load_file(other)["centroids"], load_file(codebook16)["centroids"])
    tokenizer = plugins.tokenizer_class("codebook")({"path": str(codebook16)})
    assert contract_problems(CodebookTokenizer) == [] and (tokenizer.vocab_size, tokenizer.input_size) == (16, SIZE)
    ids = tokenizer.encode(images[600:700])
    assert ids.shape == (100, 16) and ids.dtype == torch.long
    assert 0 <= int(ids.min()) and int(ids.max()) < 16 and ids.unique().numel() >= 8
    assert torch.equal(ids, CodebookTokenizer({"path": str(again)}).encode(images[600:700]))


def test_codebook_ids_are_row_major(codebook16):
    tokenizer = CodebookTokenizer({"path": str(codebook16)})
    background = tokenizer.encode(torch.zeros(1, 3, SIZE, SIZE))[0, 0]
    for row, col in [(0, 1), (2, 0), (3, 3)]:
        image = torch.zeros(1, 3, SIZE, SIZE)
        image[..., row * PATCH : (row + 1) * PATCH, col * PATCH : (col + 1) * PATCH] = 1.0
        ids = tokenizer.encode(image)[0]
        assert ids[row * 4 + col] != background
        assert (ids[torch.arange(16) != row * 4 + col] == background).all()


def test_reconstruction_error_decreases_with_vocab(digits, tmp_path):
    images, _ = digits
    errors = []
    for k in (4, 16, 64):
        path = fit_codebook(images[:500], tmp_path / f"k{k}.safetensors", vocab_size=k, patch_size=PATCH, input_size=SIZE, seed=0)
        tokenizer = CodebookTokenizer({"path": str(path)})
        test = images[1000:1300]
        ids = tokenizer.encode(test)
        book = load_codebook(path)
        recon = tokenizer.centroids[ids].reshape(*ids.shape, 3, -1) * book.std[:, None] + book.mean[:, None]
        errors.append(float((recon.flatten(2) - patchify(test, PATCH)).pow(2).mean()))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.5 * errors[0]


def test_codebook_tokens_carry_class_information(digits, codebook16):
    """Nearest class mean on one-hot token maps tells digits apart (chance: 10%)."""
    images, labels = digits
    ids = CodebookTokenizer({"path": str(codebook16)}).encode(images)
    onehot = F.one_hot(ids, 16).float().flatten(1)
    train, test = slice(0, 1000), slice(1000, None)
    means = torch.stack([onehot[train][labels[train] == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(onehot[test], means).argmin(1) == labels[test]).float().mean()
    assert accuracy > 0.6


def test_codebook_input_size_and_errors(codebook16, tmp_path):
    tokenizer = CodebookTokenizer({"path": str(codebook16), "input_size": 64})
    assert tokenizer.encode(torch.rand(2, 3, 64, 64)).shape == (2, 64)
    with pytest.raises(ValueError, match=r"input_size: 36 is not a multiple of the codebook's patch size 8"):
        CodebookTokenizer({"path": str(codebook16), "input_size": 36})
    with pytest.raises(ValueError, match=r"expects images \(B, 3, 32, 32\)"):
        CodebookTokenizer({"path": str(codebook16)}).encode(torch.rand(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"missing\.safetensors: codebook file not found"):
        CodebookTokenizer({"path": str(tmp_path / "missing.safetensors")})
    save_file({"centroids": torch.zeros(2, 3)}, tmp_path / "foreign.safetensors")
    with pytest.raises(ValueError, match=r"foreign\.safetensors: not a beitdist codebook"):
        CodebookTokenizer({"path": str(tmp_path / "foreign.safetensors")})
    (tmp_path / "junk.safetensors").write_bytes(b"not a file format")
    with pytest.raises(ValueError, match=r"junk\.safetensors: not a safetensors codebook"):
        CodebookTokenizer({"path": str(tmp_path / "junk.safetensors")})


def test_fit_on_pil_images_with_patch_norm(tmp_path):
    gen = torch.Generator().manual_seed(0)
    pictures = [Image.fromarray((torch.rand(20 + i, 30, 3, generator=gen) * 255).byte().numpy()) for i in range(6)]
    path = fit_codebook(iter(pictures), tmp_path / "pil.safetensors", vocab_size=8, patch_size=4, input_size=16,
                        feature="patch_norm", seed=3)
    tokenizer = CodebookTokenizer({"path": str(path)})
    assert tokenizer.feature == "patch_norm" and tokenizer.encode(torch.rand(2, 3, 16, 16)).shape == (2, 16)
    with pytest.raises(ValueError, match="only 96 patches to fit 512 tokens"):
        fit_codebook(iter(pictures), tmp_path / "big.safetensors", vocab_size=512, patch_size=4, input_size=16)


def test_failed_write_keeps_the_old_codebook(codebook16, tmp_path, monkeypatch):
    target = tmp_path / "book.safetensors"
    save_codebook(load_codebook(codebook16), target)
    before = target.read_bytes()

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("safetensors.torch.save_file", boom)  # the writer every safetensors output shares
    with pytest.raises(OSError, match="disk full"):
        save_codebook(load_codebook(codebook16), target, overwrite=True)
    assert target.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["book.safetensors"]


# --------------------------------------------------------------------------- CLI
def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="beitdist")
    add_tokenizer_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def test_cli_fit_digits(tmp_path, capsys):
    out = tmp_path / "tok" / "digits.safetensors"
    argv = ["tokenizer", "fit", "--images", "digits", "--out", str(out), "--vocab-size", "16",
            "--patch-size", "8", "--input-size", "32", "--max-images", "300", "--seed", "1"]
    assert run_cli(argv) == 0
    printed = capsys.readouterr().out
    assert f"wrote codebook {out}: 16 tokens" in printed and "4x4 tokens per image" in printed and "300 images" in printed
    assert CodebookTokenizer({"path": str(out)}).vocab_size == 16


def test_cli_fit_image_folder(tmp_path, capsys):
    gen = torch.Generator().manual_seed(0)
    for i, rel in enumerate(["a/x.png", "a/b/y.jpg", "z.PNG", "notes.txt"]):
        path = tmp_path / "imgs" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            path.write_text("not an image")
        else:
            Image.fromarray((torch.rand(24, 24 + i, 3, generator=gen) * 255).byte().numpy()).save(path)
    out = tmp_path / "folder.safetensors"
    argv = ["tokenizer", "fit", "--images", str(tmp_path / "imgs"), "--out", str(out),
            "--vocab-size", "4", "--patch-size", "4", "--input-size", "16"]
    assert run_cli(argv) == 0 and "fitted on 3 images" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"nothere: not a directory"):
        run_cli(["tokenizer", "fit", "--images", str(tmp_path / "nothere"), "--out", str(tmp_path / "new.safetensors")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"empty: no \.jpg/\.jpeg/\.png images found"):
        run_cli(["tokenizer", "fit", "--images", str(tmp_path / "empty"), "--out", str(tmp_path / "new.safetensors")])
