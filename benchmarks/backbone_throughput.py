"""Training-step throughput of beitdist's BEiT against transformers', side by side in one process.

One step = forward, cross-entropy, backward, AdamW step, for beitdist's backbone + classifier and
for transformers' BeitForImageClassification (attn_implementation "sdpa" and "eager"), all holding
the same weights (exported with `beitdist.export_hf`) and fed the same batch. Steps are
interleaved model by model so that drifts of a shared machine hit every column alike; the median
step time is reported. Achieved GFLOP/s counts matmul FLOPs only (patch-embedding conv, q/k/v,
attention scores and values, projection, MLP, classifier; backward = 2x forward) and is compared
with the peak of a large matmul measured in the same process.

    python benchmarks/backbone_throughput.py                      # small and base, fp32 and bf16
    python benchmarks/backbone_throughput.py --variants small --dtypes fp32 --iters 3
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import beitdist

NUM_CLASSES = 1000


def matmul_flops_per_image(config: beitdist.BackboneConfig, num_classes: int) -> float:
    """Forward matmul FLOPs of one image (2 per multiply-add)."""
    n, d, m = config.num_patches + 1, config.embed_dim, config.hidden_mlp_dim
    patch = 2 * config.num_patches * d * config.in_chans * config.patch_size**2
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * m
    return patch + config.depth * block + 2 * d * num_classes


def matmul_peak_gflops(dtype: torch.dtype, budget_s: float = 3.0) -> float:
    """Best GFLOP/s of square matmuls (512..2048) within a time budget: the hardware ceiling as
    this process's BLAS reaches it (CPUs without bf16 units run bf16 far below fp32)."""
    best = 0.0
    deadline = time.perf_counter() + budget_s
    for size in (512, 1024, 1536, 2048):
        a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
        for _ in range(3):
            start = time.perf_counter()
            torch.mm(a, b)
            best = max(best, 2 * size**3 / (time.perf_counter() - start) / 1e9)
            if time.perf_counter() > deadline:
                return best
    return best


def make_step(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, dtype: str) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05)
    autocast = dtype == "bf16"

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(pixels).logits
        torch.nn.functional.cross_entropy(logits.float(), labels).backward()
        optimizer.step()

    return step


def build_models(variant: str, image_size: int, workdir: Path) -> tuple[dict[str, torch.nn.Module], beitdist.BackboneConfig]:
    import transformers

    config = beitdist.variant(variant, image_size=image_size)
    ours = beitdist.build_model(config, "classification", {"num_classes": NUM_CLASSES})
    beitdist.export_hf(ours, workdir / variant)
    models: dict[str, torch.nn.Module] = {"beitdist": ours}
    for impl in ("sdpa", "eager"):
        models[f"transformers-{impl}"] = transformers.BeitForImageClassification.from_pretrained(
            workdir / variant, attn_implementation=impl
        )
    for model in models.values():
        model.train()
    return models, config


def bench(variant: str, dtype: str, args: argparse.Namespace, workdir: Path, peaks: dict[str, float]) -> list[dict]:
    torch.manual_seed(0)
    models, config = build_models(variant, args.image_size, workdir)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,))
    steps = {name: make_step(model, pixels, labels, dtype) for name, model in models.items()}
    for step in steps.values():
        for _ in range(args.warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.iters):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    flops = 3 * matmul_flops_per_image(config, NUM_CLASSES)
    rows = []
    for name, samples in times.items():
        images_per_s = args.batch / statistics.median(samples)
        rows.append(
            {
                "variant": variant,
                "dtype": dtype,
                "model": name,
                "images_per_s": images_per_s,
                "gflops": images_per_s * flops / 1e9,
                "peak_fraction": images_per_s * flops / 1e9 / peaks[dtype],
            }
        )
    ours = rows[0]["images_per_s"]
    for row in rows:
        row["beitdist_speedup"] = ours / row["images_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["small", "base"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/backbone_throughput.json"))
    args = parser.parse_args()

    peaks = {"fp32": matmul_peak_gflops(torch.float32), "bf16": matmul_peak_gflops(torch.bfloat16)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print(f"matmul peak (2048^3, same process): fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s")
    print("GFLOP/s counts matmul FLOPs only (patch conv, qkv, attention, proj, MLP, head; backward = 2x forward)\n")
    header = f"{'variant':8} {'dtype':5} {'model':20} {'img/s':>8} {'beitdist x':>10} {'GFLOP/s':>8} {'% peak':>7}"
    print(header)
    print("-" * len(header))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            for dtype in args.dtypes:
                for row in bench(variant, dtype, args, Path(tmp), peaks):
                    rows.append(row)
                    print(
                        f"{row['variant']:8} {row['dtype']:5} {row['model']:20} {row['images_per_s']:8.2f} "
                        f"{row['beitdist_speedup']:10.2f} {row['gflops']:8.1f} {100 * row['peak_fraction']:6.1f}%",
                        flush=True,
                    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {"batch": args.batch, "image_size": args.image_size, "iters": args.iters, "peaks_gflops": peaks,
              "torch": torch.__version__, "rows": rows}
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
