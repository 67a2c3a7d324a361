"""The DALL-E dVAE encoder as BEiT's visual tokenizer: 112 px view -> 14x14 ids of 8192.

`DalleEncoder` restates the architecture of openai/DALL-E's `dall_e/encoder.py` (same module tree
and parameter names `w`/`b`, so the published `encoder.pkl`'s state dict loads strictly) without
its `attrs` and mixed-precision machinery: runtime always uses this code, never the pickled one.

`encoder.pkl` is a pickled whole module, i.e. loading it can run arbitrary code. It is unpickled
only when the user vouched for the exact bytes (`sha256`) or said `trust: true`; the refusal
prints the file's sha256 so vouching is one copy-paste. A plain state dict (.safetensors, or a
.pt/.pth loaded with weights_only=True) needs no trust.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import re
import types
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from beitdist.errors import InputError
from beitdist.hookspecs import hookimpl
from beitdist.schema import check
from beitdist.tokenizers.base import Tokenizer

log = logging.getLogger(__name__)

LOGIT_LAPLACE_EPS = 0.1
DOWNSAMPLE = 8  # three 2x max-pools


def map_pixels(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [eps, 1 - eps]: the dVAE was trained on this range (logit-Laplace likelihood)."""
    return (1 - 2 * LOGIT_LAPLACE_EPS) * x + LOGIT_LAPLACE_EPS


class Conv2d(nn.Module):
    """'same'-padded convolution whose parameters are named `w` and `b` like DALL-E's."""

    def __init__(self, n_in: int, n_out: int, kw: int) -> None:
        super().__init__()
        if kw % 2 != 1:
            raise ValueError(f"kernel width must be odd, got {kw}")
        self.kw = kw
        self.w = nn.Parameter(torch.randn(n_out, n_in, kw, kw) / (n_in * kw**2) ** 0.5)
        self.b = nn.Parameter(torch.zeros(n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.w, self.b, padding=(self.kw - 1) // 2)


class EncoderBlock(nn.Module):
    """Residual block; the residual branch is scaled by 1 / n_layers**2 (n_layers = all blocks)."""

    def __init__(self, n_in: int, n_out: int, n_layers: int) -> None:
        super().__init__()
        if n_out % 4 != 0:
            raise ValueError(f"n_out must be a multiple of 4, got {n_out}")
        n_hid = n_out // 4
        self.post_gain = 1 / (n_layers**2)
        self.id_path = Conv2d(n_in, n_out, 1) if n_in != n_out else nn.Identity()
        self.res_path = nn.Sequential(
            OrderedDict(
                [
                    ("relu_1", nn.ReLU()),
                    ("conv_1", Conv2d(n_in, n_hid, 3)),
                    ("relu_2", nn.ReLU()),
                    ("conv_2", Conv2d(n_hid, n_hid, 3)),
                    ("relu_3", nn.ReLU()),
                    ("conv_3", Conv2d(n_hid, n_hid, 3)),
                    ("relu_4", nn.ReLU()),
                    ("conv_4", Conv2d(n_hid, n_out, 1)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.id_path(x) + self.post_gain * self.res_path(x)


class DalleEncoder(nn.Module):
    """Images (B, C, S, S) -> logits (B, vocab, S/8, S/8). Defaults are the published encoder's."""

    group_count = 4

    def __init__(
        self, n_hid: int = 256, n_blk_per_group: int = 2, input_channels: int = 3, vocab_size: int = 8192
    ) -> None:
        super().__init__()
        self.n_hid, self.n_blk_per_group = n_hid, n_blk_per_group
        self.input_channels, self.vocab_size = input_channels, vocab_size
        n_layers = self.group_count * n_blk_per_group
        widths = [n_hid, n_hid, 2 * n_hid, 4 * n_hid, 8 * n_hid]  # input, then each group's output
        layers: list[tuple[str, nn.Module]] = [("input", Conv2d(input_channels, n_hid, 7))]
        for g in range(1, self.group_count + 1):
            group: list[tuple[str, nn.Module]] = [
                (f"block_{i + 1}", EncoderBlock(widths[g - 1] if i == 0 else widths[g], widths[g], n_layers))
                for i in range(n_blk_per_group)
            ]
            if g < self.group_count:
                group.append(("pool", nn.MaxPool2d(kernel_size=2)))
            layers.append((f"group_{g}", nn.Sequential(OrderedDict(group))))
        output = OrderedDict([("relu", nn.ReLU()), ("conv", Conv2d(8 * n_hid, vocab_size, 1))])
        layers.append(("output", nn.Sequential(output)))
        self.blocks = nn.Sequential(OrderedDict(layers))

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> DalleEncoder:
        """Infer the size from the weights (so small test encoders load too), then load strictly."""
        try:
            n_hid, input_channels = state["blocks.input.w"].shape[:2]
            vocab_size = state["blocks.output.conv.w"].shape[0]
        except (KeyError, AttributeError, ValueError):
            raise InputError(
                f"{source}: not a DALL-E dVAE encoder state dict (needs blocks.input.w and blocks.output.conv.w; "
                f"found {_preview(state)})"
            ) from None
        block = re.compile(r"blocks\.group_1\.block_(\d+)\.")
        n_blk = max((int(m.group(1)) for k in state if (m := block.match(k))), default=0)
        try:  # on the meta device: no time spent on random weights that are replaced at once
            with torch.device("meta"):
                encoder = cls(int(n_hid), max(n_blk, 1), int(input_channels), int(vocab_size))
        except ValueError as err:
            raise InputError(f"{source}: not a DALL-E encoder ({err})") from None
        expected = encoder.state_dict()
        missing = [k for k in expected if k not in state]
        unexpected = [k for k in state if k not in expected]
        bad_shapes = [k for k, p in expected.items() if k in state and tuple(state[k].shape) != tuple(p.shape)]
        if missing or unexpected or bad_shapes:
            raise InputError(
                f"{source}: does not match the DALL-E encoder architecture (n_hid={n_hid}, "
                f"n_blk_per_group={n_blk}, vocab_size={vocab_size}): missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}, wrong shape {bad_shapes[:5]}"
            )
        encoder.load_state_dict({k: v.float().contiguous() for k, v in state.items()}, strict=True, assign=True)
        return encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[1] != self.input_channels:
            raise InputError(f"expected images (B, {self.input_channels}, H, W), got {tuple(x.shape)}")
        return self.blocks(x.float())


def _preview(state: Any) -> str:
    if not isinstance(state, Mapping):
        return type(state).__name__
    keys = list(state)
    return f"{len(keys)} keys: {', '.join(map(str, keys[:4]))}{', ...' if len(keys) > 4 else ''}"


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _PickledModule(nn.Module):
    """Stand-in for openai's `dall_e` classes when unpickling `encoder.pkl`: nn.Module's
    `__setstate__` restores parameters and submodules, which is all `state_dict()` needs, so the
    `dall_e` package (and its `attrs`, `requests` dependencies) need not be installed."""

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("placeholder for an unpickled dall_e module; use DalleEncoder")


class _DalleUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "dall_e" or module.startswith("dall_e."):
            return _PickledModule
        return super().find_class(module, name)


_dalle_pickle = types.ModuleType("beitdist_dalle_pickle")
_dalle_pickle.Unpickler = _DalleUnpickler  # type: ignore[attr-defined]
_dalle_pickle.load = pickle.load  # type: ignore[attr-defined]
_dalle_pickle.Pickler = pickle.Pickler  # type: ignore[attr-defined]
_dalle_pickle.dump = pickle.dump  # type: ignore[attr-defined]


def _source(path: Path, data: bytes | None) -> Path | io.BytesIO:
    return io.BytesIO(data) if data is not None else path


def _unpickle(path: Path, data: bytes | None, digest: str | None) -> Any:
    log.warning("unpickling %s (%s)", path, f"sha256 {digest} verified" if digest else "trust: true")
    try:
        return torch.load(_source(path, data), map_location="cpu", weights_only=False, pickle_module=_dalle_pickle)
    except Exception as err:
        raise InputError(f"{path}: could not unpickle: {type(err).__name__}: {err}") from None


def load_encoder_state(path: str | Path, sha256: str | None = None, trust: bool = False) -> dict[str, torch.Tensor]:
    """The encoder's weights from `path`; raises InputError naming the path and what is allowed."""
    path = Path(path)
    if not path.is_file():
        raise InputError(
            f"{path}: DALL-E encoder file not found (tokenizer.options.path: the published encoder.pkl, "
            "or a state dict as .safetensors / .pt / .pth)"
        )
    # With a pinned hash, load the very bytes that were hashed (no swap between check and use).
    data = path.read_bytes() if sha256 is not None else None
    digest = hashlib.sha256(data).hexdigest() if data is not None else None
    if sha256 is not None and digest != sha256.lower():
        raise InputError(
            f"{path}: sha256 is {digest}, but tokenizer.options.sha256 says {sha256}; refusing to load it"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load, load_file

        try:
            return load(data) if data is not None else load_file(path)
        except Exception as err:
            raise InputError(f"{path}: unreadable safetensors file: {err}") from None
    try:
        loaded = torch.load(_source(path, data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not (trust or digest is not None):
            raise InputError(
                f"{path}: is a pickled module, and unpickling it can run arbitrary code "
                f"({str(err).splitlines()[0][:120]}). If you trust this file, allow it with "
                f"tokenizer.options.sha256: {file_sha256(path)} (pins these exact bytes) "
                "or tokenizer.options.trust: true"
            ) from None
        loaded = _unpickle(path, data, digest)
    except Exception as err:
        raise InputError(f"{path}: not a torch file: {type(err).__name__}: {err}") from None
    if isinstance(loaded, nn.Module):
        loaded = loaded.state_dict()
    if not isinstance(loaded, Mapping) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise InputError(f"{path}: expected an encoder module or a state dict of tensors, got {_preview(loaded)}")
    return dict(loaded)


@dataclass(frozen=True)
class DalleOptions:
    path: str
    """The published encoder.pkl, or a state dict with its keys (.safetensors / .pt / .pth)."""
    sha256: str | None = None
    """Allows unpickling a pickled encoder whose bytes have exactly this hash."""
    trust: bool = False
    """Allows unpickling without a hash check (trusted files only)."""
    input_size: int = 112
    """Side of the view the dVAE reads (BEiT: 112 px, lanczos); tokens form a (S/8)x(S/8) grid."""

    def __post_init__(self) -> None:
        check(bool(self.path), "path", "expected the path of the DALL-E encoder weights")
        if self.sha256 is not None:
            hex64 = re.fullmatch(r"[0-9a-fA-F]{64}", self.sha256)
            check(bool(hex64), "sha256", f"expected 64 hex digits, got {self.sha256!r}")
        check(
            self.input_size >= DOWNSAMPLE and self.input_size % DOWNSAMPLE == 0,
            "input_size",
            f"expected a positive multiple of {DOWNSAMPLE}, got {self.input_size}",
        )


class DalleTokenizer(Tokenizer):
    """BEiT's original MIM targets: argmax of the dVAE encoder's logits at every 8x8 cell."""

    name = "dalle"
    Options = DalleOptions

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        state = load_encoder_state(self.opts.path, self.opts.sha256, self.opts.trust)
        self.encoder = DalleEncoder.from_state_dict(state, str(self.opts.path)).eval().requires_grad_(False)
        self.vocab_size = self.encoder.vocab_size
        self.input_size = self.opts.input_size
        log.info("DALL-E tokenizer from %s: vocab %d, %d px", self.opts.path, self.vocab_size, self.input_size)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        size = self.input_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise InputError(
                f"dalle tokenizer expects images (B, 3, {size}, {size}) in [0, 1], got {tuple(images.shape)}"
            )
        logits = self.encoder(map_pixels(images.float()))
        return logits.argmax(dim=1).flatten(1)


@hookimpl
def beitdist_register_tokenizers(registry) -> None:
    registry.add(DalleTokenizer)
