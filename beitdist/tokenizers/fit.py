"""Fitting a codebook tokenizer: k-means over image patches, and the `beitdist tokenizer fit` CLI.

Full-batch Lloyd k-means with k-means++ seeding (from 20 candidates per token) on a seeded torch
Generator, over at most `max_patches` patches drawn by reservoir sampling (random keys, keep the
smallest), so memory is bounded however many images stream in and the result depends only on the
images, their order and the seed. The defaults (50k patches, 512 tokens, 20 iterations) take
seconds to tens of seconds on a CPU; cost grows with patches x tokens x patch dimension.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from beitdist.errors import InputError
from beitdist.output_paths import check_output_file
from beitdist.tokenizers.codebook import (
    FEATURES,
    Codebook,
    features,
    is_codebook_file,
    nearest,
    patchify,
    save_codebook,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
MIN_STD = 1e-3


def _to_batches(images: Any, input_size: int, batch_size: int) -> Iterator[torch.Tensor]:
    """Tensors (b, 3, S, S) in [0, 1] from a tensor (N, 3, H, W) or an iterable of PIL images."""
    if isinstance(images, torch.Tensor):
        if images.ndim != 4 or images.shape[1] != 3:
            raise InputError(f"expected images as a tensor (N, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        for i in range(0, images.shape[0], batch_size):
            batch = images[i : i + batch_size].float()
            if batch.shape[-2:] != (input_size, input_size):
                batch = F.interpolate(batch, size=(input_size, input_size), mode="bicubic", antialias=True).clamp_(0, 1)
            yield batch
        return
    from PIL import Image

    buffer: list[torch.Tensor] = []
    for image in images:
        image = image.convert("RGB")
        if image.size != (input_size, input_size):
            image = image.resize((input_size, input_size), Image.Resampling.LANCZOS)
        buffer.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1))
        if len(buffer) == batch_size:
            yield torch.stack(buffer)
            buffer = []
    if buffer:
        yield torch.stack(buffer)


def _sample_patches(
    batches: Iterable[torch.Tensor], patch_size: int, max_patches: int, gen: torch.Generator
) -> tuple[torch.Tensor, int]:
    kept = torch.empty(0)
    keys = torch.empty(0)
    n_images = 0
    for batch in batches:
        n_images += batch.shape[0]
        patches = patchify(batch, patch_size).reshape(-1, 3 * patch_size**2)
        kept = torch.cat([kept.reshape(-1, patches.shape[1]), patches])
        keys = torch.cat([keys, torch.rand(patches.shape[0], generator=gen)])
        if kept.shape[0] > max_patches:
            keys, idx = torch.topk(keys, max_patches, largest=False, sorted=False)
            kept = kept[idx]
    if n_images == 0:
        raise InputError("no images to fit a codebook on")
    return kept, n_images


INIT_CANDIDATES_PER_TOKEN = 20


def _kmeans_pp(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding (each next centre drawn with probability proportional to its squared
    distance to the nearest centre so far). It is sequential in k, so it runs on a random subset of
    20 candidates per token; Lloyd's iterations then use every patch."""
    n = x.shape[0]
    if n > INIT_CANDIDATES_PER_TOKEN * k:
        x = x[torch.randperm(n, generator=gen)[: INIT_CANDIDATES_PER_TOKEN * k]]
        n = x.shape[0]
    x_sq = x.pow(2).sum(1)

    def dist2(i: int) -> torch.Tensor:  # |x - c|^2 = |x|^2 - 2 x.c + |c|^2, one fused pass
        return torch.addmv(x_sq, x, x[i], alpha=-2).add_(x_sq[i]).clamp_min_(0)

    chosen = [int(torch.randint(n, (1,), generator=gen))]
    d2 = dist2(chosen[0])
    for _ in range(1, k):
        cumulative = d2.cumsum(0, dtype=torch.float64)
        total = float(cumulative[-1])
        if total > 0:  # inverse-CDF draw; zero-distance candidates can never be drawn
            u = torch.rand(1, generator=gen, dtype=torch.float64) * total
            index = min(int(torch.searchsorted(cumulative, u, right=True)), n - 1)
        else:  # every candidate coincides with a centre already
            index = int(torch.randint(n, (1,), generator=gen))
        chosen.append(index)
        d2 = torch.minimum(d2, dist2(index))
    return x[chosen].clone()


def kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator) -> tuple[torch.Tensor, float]:
    """Centroids (k, D) and the mean squared distance of each row of x (N, D) to its centroid."""
    n = x.shape[0]
    if n < k:
        raise InputError(f"only {n} patches to fit {k} tokens; use more images or a smaller vocab size")
    centroids = _kmeans_pp(x, k, gen)
    assign = nearest(x, centroids)
    for step in range(iters):
        counts = torch.bincount(assign, minlength=k)
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        empty = int((~filled).sum())
        if empty:  # re-seed empty clusters with the worst-served patches
            dist = (x - centroids[assign]).pow(2).sum(1)
            centroids[~filled] = x[torch.topk(dist, empty).indices]
        new_assign = nearest(x, centroids)
        changed = int((new_assign != assign).sum())
        assign = new_assign
        log.debug("k-means step %d: %d assignments changed", step + 1, changed)
        if changed == 0 and not empty:
            break
    error = float((x - centroids[assign]).pow(2).sum(1).mean())
    return centroids, error


def fit_codebook(
    images: Any,
    out_path: str | os.PathLike,
    vocab_size: int = 512,
    patch_size: int = 8,
    input_size: int = 112,
    iters: int = 20,
    seed: int = 0,
    max_patches: int = 50_000,
    feature: str = "pixels",
    batch_size: int = 256,
    overwrite: bool = False,
) -> Path:
    """Fit a `vocab_size`-token codebook on the P x P patches of `images` (a tensor (N, 3, H, W)
    in [0, 1] or an iterable of PIL images, resized to `input_size`) and write it to `out_path`
    (a new file, or an existing codebook with `overwrite`: checked before fitting)."""
    check_output_file(out_path, "codebook", is_codebook_file, overwrite=overwrite)
    if vocab_size < 2:
        raise InputError(f"vocab_size must be >= 2, got {vocab_size}")
    if patch_size < 1 or input_size < patch_size or input_size % patch_size:
        raise InputError(f"input_size ({input_size}) must be a positive multiple of patch_size ({patch_size})")
    if feature not in FEATURES:
        raise InputError(f"unknown codebook feature {feature!r}; allowed: {', '.join(FEATURES)}")
    if iters < 0 or max_patches < vocab_size:
        raise InputError(f"need iters >= 0 and max_patches >= vocab_size, got {iters} and {max_patches}")
    gen = torch.Generator().manual_seed(seed)
    patches, n_images = _sample_patches(_to_batches(images, input_size, batch_size), patch_size, max_patches, gen)
    channels = patches.reshape(patches.shape[0], 3, -1)
    mean = channels.mean(dim=(0, 2))
    std = channels.std(dim=(0, 2)).clamp_min(MIN_STD)
    codebook = Codebook(torch.empty(0), patch_size, input_size, feature, mean, std)
    x = features(patches, feature, mean, std, codebook.eps)
    codebook.centroids, error = kmeans(x, vocab_size, iters, gen)
    path = save_codebook(codebook, out_path, overwrite=overwrite)
    log.info(
        "codebook %s: %d tokens from %d patches of %d images, mean squared feature error %.4f",
        path, vocab_size, x.shape[0], n_images, error,
    )
    return path


def image_files(directory: str | os.PathLike) -> list[Path]:
    root = Path(directory)
    if not root.is_dir():
        raise InputError(f"{root}: not a directory (--images takes an image folder or the word 'digits')")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InputError(f"{root}: no {'/'.join(IMAGE_SUFFIXES)} images found (searched recursively)")
    return files


def load_digits_images(input_size: int, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits (shipped with it, no download) as RGB images (N, 3, S, S) in
    [0, 1], bilinearly upsampled, and their labels: a real, tiny, offline image set."""
    from beitdist.data.datasets import load_digits_arrays

    digit_images, digit_labels = load_digits_arrays()  # a ValueError says scikit-learn is missing
    pixels = torch.from_numpy(digit_images[:limit].astype(np.float32) / 16.0)[:, None]
    images = F.interpolate(pixels, size=(input_size, input_size), mode="bilinear", align_corners=False)
    return images.clamp_(0, 1).expand(-1, 3, -1, -1).contiguous(), torch.from_numpy(digit_labels[:limit])


def _open_images(files: list[Path]) -> Iterator[Any]:
    from PIL import Image

    for file in files:
        with Image.open(file) as image:
            yield image.convert("RGB")


def _cmd_fit(args: argparse.Namespace) -> int:
    if args.images == "digits":
        images: Any = load_digits_images(args.input_size, args.max_images)[0]
        n_images, source = images.shape[0], "scikit-learn digits"
    else:
        files = image_files(args.images)
        if args.max_images is not None and args.max_images < len(files):
            pick = np.random.default_rng(args.seed).choice(len(files), args.max_images, replace=False)
            files = [files[i] for i in sorted(pick)]
        images, n_images, source = _open_images(files), len(files), str(args.images)
    path = fit_codebook(
        images, args.out, vocab_size=args.vocab_size, patch_size=args.patch_size,
        input_size=args.input_size, iters=args.iters, seed=args.seed, max_patches=args.max_patches,
        feature=args.feature, overwrite=args.overwrite,
    )
    grid = args.input_size // args.patch_size
    print(
        f"wrote codebook {path}: {args.vocab_size} tokens, {args.feature} features of "
        f"{args.patch_size}x{args.patch_size} patches of {args.input_size} px views ({grid}x{grid} tokens per image), "
        f"fitted on {n_images} images from {source}"
    )
    return 0


def add_tokenizer_cli(subparsers: Any) -> argparse.ArgumentParser:
    """Register `tokenizer fit` on the CLI's subparsers; returns the `tokenizer` parser."""
    parser = subparsers.add_parser(
        "tokenizer",
        help="build visual tokenizers (MIM targets)",
        description="Build visual tokenizers whose token ids are the targets of masked image modeling.",
    )
    commands = parser.add_subparsers(dest="tokenizer_command", required=True)
    fit = commands.add_parser(
        "fit",
        help="fit a k-means codebook tokenizer on image patches (offline, seconds on a CPU)",
        description="Cluster image patches with k-means and write a codebook for the 'codebook' tokenizer.",
    )
    fit.add_argument(
        "--images", required=True,
        help="image folder (searched recursively for .jpg/.jpeg/.png), or the word 'digits' "
        "(scikit-learn's 8x8 digits; write ./digits for a folder of that name)",
    )
    fit.add_argument("--out", required=True, help="codebook file to write (.safetensors, written atomically)")
    fit.add_argument("--overwrite", action="store_true", help="replace an existing codebook at --out")
    fit.add_argument("--vocab-size", type=int, default=512, help="number of tokens (k-means centroids)")
    fit.add_argument("--patch-size", type=int, default=8, help="patch side in pixels of the tokenizer's view")
    fit.add_argument("--input-size", type=int, default=112, help="side in pixels the images are resized to")
    fit.add_argument(
        "--feature", choices=FEATURES, default="pixels",
        help="patch features: channel-normalised pixels, or also per-patch normalised (patch_norm)",
    )
    fit.add_argument("--iters", type=int, default=20, help="k-means iterations at most")
    fit.add_argument("--max-patches", type=int, default=50_000, help="patches sampled for k-means")
    fit.add_argument("--max-images", type=int, help="use a random subset of this many images")
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(run=_cmd_fit)
    from beitdist.heads.vqkd import add_export_cli  # the head that trains it owns its checkpoint keys

    add_export_cli(commands)
    return parser

