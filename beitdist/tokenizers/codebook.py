"""An offline visual tokenizer: every patch -> its nearest k-means centroid (no download needed).

The DALL-E dVAE needs a 200 MB pickled download; for quick starts, tests, small or unusual
domains, `beitdist tokenizer fit` (see `fit.py`) clusters the dataset's own patches and this
tokenizer assigns each patch to the nearest centroid. Weaker targets than a learned dVAE, but they
carry the image's structure, train in seconds, and need no network or trust.

File format (safetensors, a plain tensor dict; metadata {"format": "beitdist-codebook", "version"}):

    centroids   float32 (K, D)   cluster centres in feature space; K is the vocabulary
    patch_size  int64 ()         patch side P in pixels of the tokenizer's view
    input_size  int64 ()         side S of the view the codebook was fitted on
    feature     uint8 (n,)       ASCII name of the feature kind (see FEATURES)
    mean, std   float32 (3,)     per-channel pixel statistics of the fitted patches
    eps         float32 ()       variance floor of the per-patch normalisation

A patch's feature is its channel-normalised pixels, flattened (channel, row, column) to
D = 3 * P * P; for "patch_norm" each patch is further shifted and scaled to zero mean, unit
variance, so tokens describe shape and texture rather than brightness (as MAE's normalised pixel
targets do).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from beitdist.errors import InputError
from beitdist.hookspecs import hookimpl
from beitdist.output_paths import check_output_file, write_safetensors_file
from beitdist.schema import check
from beitdist.tokenizers.base import Tokenizer

log = logging.getLogger(__name__)

FORMAT, VERSION = "beitdist-codebook", "1"
FEATURES = ("pixels", "patch_norm")
KEYS = ("centroids", "patch_size", "input_size", "feature", "mean", "std", "eps")


@dataclass
class Codebook:
    centroids: torch.Tensor
    patch_size: int
    input_size: int
    feature: str
    mean: torch.Tensor
    std: torch.Tensor
    eps: float = 1e-2

    @property
    def vocab_size(self) -> int:
        return int(self.centroids.shape[0])


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, H/P * W/P, 3 * P * P), patches in row-major order like the backbone's."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise InputError(f"image size {h}x{w} is not a multiple of the patch size {p}")
    x = images.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def features(patches: torch.Tensor, kind: str, mean: torch.Tensor, std: torch.Tensor, eps: float) -> torch.Tensor:
    """Patch pixels (..., 3 * P * P) -> the feature vectors the centroids live in."""
    channels = mean.numel()
    shape = patches.shape
    x = patches.float().reshape(*shape[:-1], channels, -1)
    x = (x - mean.reshape(channels, 1)) / std.reshape(channels, 1)
    x = x.reshape(shape)
    if kind == "patch_norm":
        x = (x - x.mean(-1, keepdim=True)) / (x.var(-1, keepdim=True, unbiased=False) + eps).sqrt()
    elif kind != "pixels":
        raise InputError(f"unknown codebook feature {kind!r}; allowed: {', '.join(FEATURES)}")
    return x


def nearest(x: torch.Tensor, centroids: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    """Index of the nearest centroid for each row of x (N, D): argmin |c|^2 - 2 x.c, in chunks of
    about `chunk` distances so a large batch against a large vocabulary stays within memory."""
    c_sq = centroids.pow(2).sum(1)
    rows = max(1, chunk // max(1, centroids.shape[0]))
    out = [torch.addmm(c_sq, x[i : i + rows], centroids.T, alpha=-2).argmin(dim=1) for i in range(0, x.shape[0], rows)]
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long, device=x.device)


def is_codebook_file(path: Path) -> bool:
    """Whether `path` is a file this module wrote (safetensors with the codebook format tag)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - any unreadable file is simply not a codebook
        return False


def save_codebook(codebook: Codebook, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write atomically (temp file in the same directory, then os.replace): a crash never leaves a
    half-written codebook where a training run would read it. An existing codebook at `path` is
    replaced only with `overwrite`; any other file there is refused (`OutputError`)."""
    path = check_output_file(path, "codebook", is_codebook_file, overwrite=overwrite)
    tensors = {
        "centroids": codebook.centroids.detach().float().contiguous().cpu(),
        "patch_size": torch.tensor(codebook.patch_size, dtype=torch.int64),
        "input_size": torch.tensor(codebook.input_size, dtype=torch.int64),
        "feature": torch.tensor(list(codebook.feature.encode("ascii")), dtype=torch.uint8),
        "mean": codebook.mean.detach().float().contiguous().cpu(),
        "std": codebook.std.detach().float().contiguous().cpu(),
        "eps": torch.tensor(float(codebook.eps), dtype=torch.float32),
    }
    return write_safetensors_file(path, tensors, {"format": FORMAT, "version": VERSION})


def load_codebook(path: str | os.PathLike) -> Codebook:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: codebook file not found (write one with `beitdist tokenizer fit --out {path} ...`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as err:
        raise InputError(f"{path}: not a safetensors codebook file ({type(err).__name__}: {err})") from None
    missing = [k for k in KEYS if k not in tensors]
    if metadata.get("format") != FORMAT or missing:
        raise InputError(
            f"{path}: not a beitdist codebook (format {metadata.get('format')!r}, missing {missing}); "
            "write one with `beitdist tokenizer fit`"
        )
    if metadata.get("version") != VERSION:
        raise InputError(
            f"{path}: codebook version {metadata.get('version')!r}; this beitdist reads version {VERSION}"
        )
    codebook = Codebook(
        centroids=tensors["centroids"].float(),
        patch_size=int(tensors["patch_size"]),
        input_size=int(tensors["input_size"]),
        feature=bytes(tensors["feature"].tolist()).decode("ascii"),
        mean=tensors["mean"].float(),
        std=tensors["std"].float(),
        eps=float(tensors["eps"]),
    )
    dim = codebook.mean.numel() * codebook.patch_size**2
    if codebook.feature not in FEATURES or codebook.centroids.ndim != 2 or codebook.centroids.shape[1] != dim:
        raise InputError(
            f"{path}: inconsistent codebook (feature {codebook.feature!r}, "
            f"centroids {tuple(codebook.centroids.shape)}, "
            f"expected (K, {dim}) for patch size {codebook.patch_size})"
        )
    return codebook


@dataclass(frozen=True)
class CodebookOptions:
    path: str
    """Codebook file written by `beitdist tokenizer fit`."""
    input_size: int | None = None
    """Side of the view to tokenize; None: the size the codebook was fitted on."""

    def __post_init__(self) -> None:
        check(bool(self.path), "path", "expected the path of a codebook file")
        if self.input_size is not None:
            check(self.input_size > 0, "input_size", f"expected a positive int, got {self.input_size}")


class CodebookTokenizer(Tokenizer):
    """Nearest-centroid ids of every patch of a `input_size` view, row-major."""

    name = "codebook"
    Options = CodebookOptions
    centroids: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, options: Any = None) -> None:
        super().__init__(options)
        codebook = load_codebook(self.opts.path)
        self.patch_size, self.feature, self.eps = codebook.patch_size, codebook.feature, codebook.eps
        self.input_size = self.opts.input_size or codebook.input_size
        if self.input_size % self.patch_size:
            raise InputError(
                f"tokenizer.options.input_size: {self.input_size} is not a multiple of the codebook's patch size "
                f"{self.patch_size} ({self.opts.path})"
            )
        self.vocab_size = codebook.vocab_size
        self.register_buffer("centroids", codebook.centroids)
        self.register_buffer("mean", codebook.mean)
        self.register_buffer("std", codebook.std)
        log.info(
            "codebook tokenizer %s: %d tokens, %d px patches of a %d px view",
            self.opts.path, self.vocab_size, self.patch_size, self.input_size,
        )

    @property
    def grid(self) -> int:
        return self.input_size // self.patch_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) in [0, 1] -> (B, N, D) feature vectors, the space the centroids live in."""
        size = self.input_size
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, size, size):
            raise InputError(
                f"codebook tokenizer expects images (B, 3, {size}, {size}) in [0, 1], got {tuple(images.shape)}"
            )
        return features(patchify(images.float(), self.patch_size), self.feature, self.mean, self.std, self.eps)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        x = self.features(images)
        b, n, d = x.shape
        return nearest(x.reshape(b * n, d), self.centroids).reshape(b, n)


@hookimpl
def beitdist_register_tokenizers(registry) -> None:
    registry.add(CodebookTokenizer)
