"""Training-step and inference throughput of beitdist's BEiT against transformers' and timm's,
side by side in one process.

Training step = forward, cross-entropy, backward, AdamW step (torch's fused AdamW for every
model, so the optimizer costs the same everywhere). Inference = eval mode, `torch.inference_mode`,
forward only. Models: beitdist's backbone + classifier; transformers' BeitForImageClassification
with attn_implementation "sdpa" and "eager", holding the same weights (exported with
`beitdist.export_hf`); timm's Beit with the same architecture (its own random init: throughput
does not depend on the weights' values); optionally beitdist compiled (`--compile`, the recipe's
`engine.compile`). timm imports torchvision, which may not import beside the installed torch:
then its column says why and the ratio is taken against the peers that ran.

Every model is fed the same batch; steps are interleaved model by model so that drifts of a
shared machine hit every column alike; the median time is reported. Achieved GFLOP/s counts
matmul FLOPs only (patch-embedding conv, q/k/v, attention scores and values, projection, MLP,
classifier; a training step = 3x forward: backward computes two matmuls per forward one) and is
compared with the best square-matmul rate measured in the same process. `mm %` is the share of
one profiled step (torch.profiler, self time on the device: CPU time on a CPU, kernel time on a
GPU) spent in matmul-class ops (mm, addmm, bmm, baddbmm, convolutions, and fused attention
kernels, whose time is mostly their two matmuls): % peak / mm % is how fast the matmuls
themselves run, and 1 - mm % the time left for everything else (norms, GELU, softmax, adds, the
optimizer) to shrink. On a GPU the JSON also gives `device_busy`, kernel time / wall time of
that step: well below 1, the GPU waits for Python and kernel launches (small batches), and mm %
then describes only the busy part.

On a GPU (`--device cuda`, the default when one is visible) every model, batch and peak matmul
runs there, timings wait for the GPU (`torch.cuda.synchronize`), and each row also gives the
memory its steps add on top of what is resident (`step GiB`: `torch.cuda.max_memory_allocated`
during the model's warm-up steps minus what was allocated before them; the optimizer state of a
training step is in it). fp32 matmuls run at torch's default precision ("highest": no TF32)
unless `--matmul-precision high` is given; the peak is measured at the same setting.

    python benchmarks/backbone_throughput.py                      # small and base, fp32 and bf16
    python benchmarks/backbone_throughput.py --variants small --dtypes fp32 --iters 3
    python benchmarks/backbone_throughput.py --modes infer --compile
    python benchmarks/backbone_throughput.py --device cuda --variants small base large --iters 20 --warmup 3
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
from typing import Any

import torch

import beitdist

NUM_CLASSES = 1000
PEERS = ("transformers-sdpa", "transformers-eager", "timm")
TARGETS = {("train", "fp32"): 1.0, ("train", "bf16"): 1.1}
PEAK_TARGET = 0.85


def matmul_flops_per_image(config: beitdist.BackboneConfig, num_classes: int) -> float:
    """Forward matmul FLOPs of one image (2 per multiply-add)."""
    n, d, m = config.num_patches + 1, config.embed_dim, config.hidden_mlp_dim
    patch = 2 * config.num_patches * d * config.in_chans * config.patch_size**2
    block = 2 * n * d * 3 * d + 2 * 2 * n * n * d + 2 * n * d * d + 2 * 2 * n * d * m
    return patch + config.depth * block + 2 * d * num_classes


PEAK_SIZES = {"cpu": (512, 1024, 1536, 2048), "cuda": (2048, 4096, 8192)}
"""Square matmul sizes for the peak: a GPU needs large ones to fill its units."""


MATMUL_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::mkldnn_convolution",
              "aten::cudnn_convolution", "aten::convolution_backward", "aten::_scaled_dot_product_flash_attention",
              "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
              "aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_efficient_attention_forward",
              "aten::_efficient_attention_backward", "aten::_flash_attention_forward", "aten::_flash_attention_backward",
              "aten::_scaled_dot_product_flash_attention_backward", "aten::_scaled_dot_product_efficient_attention_backward",
              "aten::_scaled_dot_product_cudnn_attention_backward",
              "aten::_scaled_dot_product_flash_attention_for_cpu_backward")
"""Ops counted as matmul work in `matmul_share` (their backward ops included)."""


def matmul_share(step: Callable[[], None], device: torch.device) -> tuple[float | None, float | None]:
    """(share of one step's device time in MATMUL_OPS, share of the step's wall time the GPU was
    busy; None on a CPU). Self times, so nested ops count once. On a GPU the kernels are counted
    once each, as torch's own summary table does: the kernel events themselves, not the aten ops
    that launched them nor user annotations (which carry the same kernel time again); the aten
    ops' device time says which kernels are matmuls."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    synchronize(device)
    start = time.perf_counter()
    with profile(activities=activities) as prof:
        step()
        synchronize(device)
    wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    if cuda:
        total = sum(e.self_device_time_total for e in events
                    if e.device_type == DeviceType.CUDA and not e.is_user_annotation)
        matmul = sum(e.self_device_time_total for e in events if e.device_type == DeviceType.CPU and e.key in MATMUL_OPS)
        busy = total / wall_us if wall_us else None
    else:
        total = sum(e.self_cpu_time_total for e in events)
        matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMUL_OPS)
        busy = None
    return (matmul / total if total else None), busy


def resolve_device(name: str, parser: argparse.ArgumentParser) -> torch.device:
    """`auto`: the GPU when one is visible, else the CPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no GPU here (torch.cuda.is_available() is False)")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on `device` (a GPU runs asynchronously; a CPU has nothing queued)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak_gflops(dtype: torch.dtype, device: torch.device, budget_s: float = 3.0) -> float:
    """Best GFLOP/s of square matmuls within a time budget: the hardware ceiling as this process's
    BLAS reaches it (CPUs without bf16 units run bf16 far below fp32)."""
    best = 0.0
    deadline = time.perf_counter() + budget_s
    for size in PEAK_SIZES[device.type]:
        a, b = (torch.randn(size, size, dtype=dtype, device=device) for _ in range(2))
        torch.mm(a, b)  # the first call picks and loads a kernel
        repeats = 10 if device.type == "cuda" else 1  # a GPU matmul takes ~1 ms: time several back to back
        for _ in range(3):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(repeats):
                torch.mm(a, b)
            synchronize(device)
            best = max(best, repeats * 2 * size**3 / (time.perf_counter() - start) / 1e9)
            if time.perf_counter() > deadline:
                return best
    return best


def logits_of(output: Any) -> torch.Tensor:
    return output.logits if hasattr(output, "logits") else output


def optimizer_step(model: torch.nn.Module, loss: Callable[[], torch.Tensor], device: torch.device,
                   bf16: bool) -> Callable[[], None]:
    """One training step: `loss()` under bf16 autocast when asked, backward, and torch's fused
    AdamW, the same optimizer for every model so that it costs the same everywhere."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            value = loss()
        value.backward()
        optimizer.step()

    return step


def train_step(model: torch.nn.Module, pixels: torch.Tensor, labels: torch.Tensor, bf16: bool) -> Callable[[], None]:
    return optimizer_step(
        model, lambda: torch.nn.functional.cross_entropy(logits_of(model(pixels)).float(), labels), pixels.device, bf16)


def infer_step(model: torch.nn.Module, pixels: torch.Tensor, bf16: bool) -> Callable[[], None]:
    def step() -> None:
        with torch.inference_mode(), torch.autocast(pixels.device.type, dtype=torch.bfloat16, enabled=bf16):
            logits_of(model(pixels))

    return step


def timm_model(config: beitdist.BackboneConfig) -> torch.nn.Module:
    """timm's Beit with beitdist's architecture (raises if timm cannot be imported)."""
    from timm.models.beit import Beit

    return Beit(img_size=config.image_size[0], patch_size=config.patch_size, num_classes=NUM_CLASSES,
                embed_dim=config.embed_dim, depth=config.depth, num_heads=config.num_heads,
                mlp_ratio=config.hidden_mlp_dim / config.embed_dim, qkv_bias=config.qkv_bias,
                use_abs_pos_emb=config.abs_pos_emb, use_rel_pos_bias=config.rel_pos_bias == "per_block",
                use_shared_rel_pos_bias=config.rel_pos_bias == "shared", init_values=config.layer_scale_init or None,
                global_pool="avg" if config.pooling == "mean" else "token")


def build_models(variant: str, image_size: int, workdir: Path, compile_ours: bool, device: torch.device
                 ) -> tuple[dict[str, torch.nn.Module], dict[str, str], beitdist.BackboneConfig]:
    """The models that could be built (on `device`), and why the others could not."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    config = beitdist.variant(variant, image_size=image_size)
    ours = beitdist.build_model(config, "classification", {"num_classes": NUM_CLASSES})
    beitdist.export_hf(ours, workdir / variant, overwrite=True)
    models: dict[str, torch.nn.Module] = {"beitdist": ours}
    missing: dict[str, str] = {}
    if compile_ours:
        compiled = beitdist.build_model(config, "classification", {"num_classes": NUM_CLASSES})
        compiled.load_state_dict(ours.state_dict())
        compiled.compile()
        models["beitdist-compiled"] = compiled
    for impl in ("sdpa", "eager"):
        models[f"transformers-{impl}"] = transformers.BeitForImageClassification.from_pretrained(
            workdir / variant, attn_implementation=impl
        )
    try:
        models["timm"] = timm_model(config)
    except Exception as err:  # ImportError, or torchvision failing to load beside this torch
        missing["timm"] = f"not importable ({type(err).__name__}: {str(err).splitlines()[0][:80]})"
    return {name: model.to(device) for name, model in models.items()}, missing, config


def bench(variant: str, dtype: str, mode: str, args: argparse.Namespace, workdir: Path,
          peaks: dict[str, float]) -> list[dict[str, Any]]:
    torch.manual_seed(0)
    device = args.device
    models, missing, config = build_models(variant, args.image_size, workdir, args.compile, device)
    pixels = torch.randn(args.batch, 3, args.image_size, args.image_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
    bf16 = dtype == "bf16"
    steps: dict[str, Callable[[], None]] = {}
    for name, model in models.items():
        model.train(mode == "train")
        steps[name] = train_step(model, pixels, labels, bf16) if mode == "train" else infer_step(model, pixels, bf16)
    warmup_s: dict[str, float] = {}
    step_bytes: dict[str, int | None] = {}
    for name, step in steps.items():
        resident = _reset_peak_memory(device)
        start = time.perf_counter()
        for _ in range(args.warmup):
            step()
        synchronize(device)
        warmup_s[name] = time.perf_counter() - start
        step_bytes[name] = torch.cuda.max_memory_allocated(device) - resident if device.type == "cuda" else None
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.iters):
        for name, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    profiled = {name: matmul_share(step, device) for name, step in steps.items()}
    flops = (3 if mode == "train" else 1) * matmul_flops_per_image(config, NUM_CLASSES)
    rows = []
    for name, samples in times.items():
        images_per_s = args.batch / statistics.median(samples)
        rows.append({"variant": variant, "dtype": dtype, "mode": mode, "model": name, "images_per_s": images_per_s,
                     "gflops": images_per_s * flops / 1e9, "peak_fraction": images_per_s * flops / 1e9 / peaks[dtype],
                     "warmup_s": warmup_s[name], "step_bytes": step_bytes[name], "matmul_share": profiled[name][0],
                     "device_busy": profiled[name][1],
                     "step_times_s": samples})
    for name, why in missing.items():
        rows.append({"variant": variant, "dtype": dtype, "mode": mode, "model": name, "images_per_s": None, "note": why})
    ours = rows[0]["images_per_s"]
    for row in rows:
        row["beitdist_speedup"] = ours / row["images_per_s"] if row["images_per_s"] else None
    return rows


def _reset_peak_memory(device: torch.device) -> int:
    """Bytes allocated on the GPU now, with its peak counter restarted from here (0 on a CPU)."""
    if device.type != "cuda":
        return 0
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    return torch.cuda.memory_allocated(device)


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """beitdist against the faster peer that ran, and the targets of this benchmark."""
    measured = {r["model"]: r for r in rows if r["images_per_s"]}
    peers = {name: r["images_per_s"] for name, r in measured.items() if name in PEERS}
    ours = measured["beitdist"]
    best_peer = max(peers, key=peers.get)
    out: dict[str, Any] = {"variant": ours["variant"], "dtype": ours["dtype"], "mode": ours["mode"],
                           "fastest_peer": best_peer, "ratio_vs_fastest_peer": ours["images_per_s"] / peers[best_peer],
                           "peak_fraction": ours["peak_fraction"]}
    if "beitdist-compiled" in measured:
        out["compiled_ratio_vs_fastest_peer"] = measured["beitdist-compiled"]["images_per_s"] / peers[best_peer]
    target = TARGETS.get((ours["mode"], ours["dtype"]))
    if target is not None:
        out["target_ratio"] = target
    return out


def print_row(row: dict[str, Any]) -> None:
    head = f"{row['variant']:6} {row['mode']:5} {row['dtype']:5} {row['model']:19}"
    if row["images_per_s"] is None:
        print(f"{head} {row['note']}", flush=True)
        return
    memory = f"{row['step_bytes'] / 1024**3:9.2f}" if row.get("step_bytes") is not None else f"{'-':>9}"
    share = f"{100 * row['matmul_share']:5.1f}%" if row.get("matmul_share") is not None else f"{'-':>6}"
    print(f"{head} {row['images_per_s']:8.2f} {row['beitdist_speedup']:10.2f} {row['gflops']:8.1f} "
          f"{100 * row['peak_fraction']:6.1f}% {share} {row['warmup_s']:8.1f} {memory}", flush=True)


def print_summary(item: dict[str, Any]) -> None:
    line = (f"  -> beitdist / {item['fastest_peer']} = {item['ratio_vs_fastest_peer']:.2f}x"
            + (f" (target >= {item['target_ratio']:.1f}x)" if "target_ratio" in item else "")
            + (f", compiled {item['compiled_ratio_vs_fastest_peer']:.2f}x" if "compiled_ratio_vs_fastest_peer" in item else ""))
    if item["dtype"] == "fp32":
        line += f"; {100 * item['peak_fraction']:.0f}% of the fp32 matmul peak (target >= {100 * PEAK_TARGET:.0f}%)"
    else:
        line += f"; {100 * item['peak_fraction']:.0f}% of the bf16 matmul peak"
    print(line, flush=True)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"GPU {torch.cuda.get_device_name(device)}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["small", "base"])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--modes", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="add beitdist under torch.compile (minutes to compile on a CPU)")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="where models and peak run (auto: the GPU when one is visible)")
    parser.add_argument("--matmul-precision", default="highest", choices=["highest", "high"],
                        help="torch.set_float32_matmul_precision for models and peak (high: TF32 on GPUs)")
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/backbone_throughput.json"))
    args = parser.parse_args()
    args.device = resolve_device(args.device, parser)
    torch.set_float32_matmul_precision(args.matmul_precision)

    peaks = {"fp32": matmul_peak_gflops(torch.float32, args.device),
             "bf16": matmul_peak_gflops(torch.bfloat16, args.device)}
    print(f"torch {torch.__version__}, {device_name(args.device)}, fp32 matmul precision {args.matmul_precision}")
    print(f"matmul peak (square matmuls up to {PEAK_SIZES[args.device.type][-1]}, same process): "
          f"fp32 {peaks['fp32']:.1f} GFLOP/s, bf16 {peaks['bf16']:.1f} GFLOP/s")
    print("GFLOP/s counts matmul FLOPs only (patch conv, qkv, attention, proj, MLP, head); train = 3x forward;"
          " mm % = share of a profiled step in matmul and fused-attention ops; warmup s includes compiling\n")
    header = (f"{'size':6} {'mode':5} {'dtype':5} {'model':19} {'img/s':>8} {'beitdist x':>10} {'GFLOP/s':>8} "
              f"{'% peak':>7} {'mm %':>6} {'warmup s':>8} {'step GiB':>9}")
    print(header)
    print("-" * len(header))
    rows, summaries = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for variant in args.variants:
            for mode in args.modes:
                for dtype in args.dtypes:
                    group = bench(variant, dtype, mode, args, Path(tmp), peaks)
                    for row in group:
                        print_row(row)
                    summaries.append(summary(group))
                    print_summary(summaries[-1])
                    rows.extend(group)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {"batch": args.batch, "image_size": args.image_size, "iters": args.iters, "peaks_gflops": peaks,
              "device": device_name(args.device), "matmul_precision": args.matmul_precision,
              "threads": torch.get_num_threads(), "torch": torch.__version__, "rows": rows, "summary": summaries}
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
