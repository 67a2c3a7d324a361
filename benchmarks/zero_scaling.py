"""Per-rank peak memory and step time of BEiT training at 1 and 2 workers under ZeRO stages 0-3.

For every (workers, stage) pair, runs `python -m torch.distributed.run --nproc_per_node=N -m
beitdist train` (on a CPU: gloo, DS_ACCELERATOR=cpu, one OpenMP thread per rank by default, so
each rank computes on one core whatever the number of workers) on a recipe written here: the
variant at full size with a classification head on digits (8x8 images upscaled to the image size),
fp32 (or `--precision bf16`), no augmentation, `--batch` images per rank, `--steps` steps, no checkpoint before the last step, and
the machinery of `_rank_runs` (shared with beit_large_zero3_memory.py).

Memory on a CPU: each rank's training peak, VmHWM when the progress file first shows the last step (so the
evaluation, the checkpoint that the trainer always writes after the last step and rank 0's fp32
consolidation are left out; they are in `run_peak` of the JSON). As in the memory benchmark, a
baseline run with a minuscule backbone (same world, stage, image size and data) measures what a
rank costs before the model; `net` = training peak - baseline is set against the planner's device
total for the run (`beitdist.plan.plan(count_parameters(...), world, stage, precision,
activations=activation_bytes(...))`), ratio = net / planned. With --no-baseline the baseline is
0 and the ratio compares the gross peak. The row shows the rank with the largest net.

Step time: rank 0's seconds of each loop iteration as the Trainer records them in
train_result.json (`timing.iteration_s`: data, forward, backward, DeepSpeed's reduction and step,
callbacks; evaluation and checkpoints left out). The first step (warm-up: lazy optimizer state,
first gathers) is excluded; the step time is the median of the others. images/s total = workers x
batch / step time; scaling efficiency = images/s total / (workers x images/s total of 1 worker at
the same stage).

On GPUs (`--device cuda`, the default when torch sees one): NCCL, DeepSpeed's CUDA accelerator,
one GPU per rank (at most as many workers as GPUs), and memory is each rank's peak of
`torch.cuda.max_memory_allocated` as the Trainer records it (`timing.device_peak_bytes` of
train_result.json: up to the last step, its evaluation and checkpoint included, consolidation
not). That counts tensors only, so no baseline run is needed (`base GiB` is 0). `--precision bf16`
trains in bf16 (DeepSpeed's bf16 mode) and the plan is made for bf16. `data ms` is rank 0's median
wait for its batch (`timing.data_s`); `--loader-workers` moves loading out of the training process.

    python benchmarks/zero_scaling.py                                    # BEiT-B, 224 px, 8 runs + baselines
    python benchmarks/zero_scaling.py --variant base --image-size 64 --steps 3    # quick
    python benchmarks/zero_scaling.py --variant tiny --image-size 32 --stages 3 --steps 3 --no-baseline
    python benchmarks/zero_scaling.py --device cuda --variant large --workers 1 --stages 0 3 --precision bf16 \
        --batch 32 --steps 10 --loader-workers 4
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

from _rank_runs import RankMemory, classification_recipe, environment, outcome, peak_in_training, predicted, train
from beitdist.plan import GIB, MemoryPlan

log = logging.getLogger("zero_scaling")

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "zero_scaling.json"
VAL_FRACTION = 0.005
"""One validation image per digit class (10 in all): the evaluation after the last step stays short."""


def recipe(args: argparse.Namespace, workers: int, stage: int, reference: bool = False) -> dict[str, Any]:
    return classification_recipe(f"{args.variant}_{args.image_size}px_w{workers}_zero{stage}", args.out / "runs",
                                 args.variant, args.image_size, args.patch_size, args.batch, args.steps, stage,
                                 reference=reference, val_fraction=VAL_FRACTION, val_batch_size=args.batch,
                                 precision=args.precision, loader_workers=args.loader_workers)


def host_rank_rows(ranks: dict[int, RankMemory], baseline: dict[int, RankMemory]) -> list[dict[str, Any]]:
    """Per-rank peaks on a CPU run: VmHWM when the last step was seen, less the baseline's."""
    rows = []
    for rank, m in sorted(ranks.items()):
        base = peak_in_training(baseline[rank]) if rank in baseline else 0
        rows.append({"rank": rank, "train_peak": peak_in_training(m), "train_peak_seen": m.train_peak is not None,
                     "baseline": base, "net": peak_in_training(m) - base, "run_peak": m.peak})
    return rows


def device_rank_rows(timing: dict[str, Any]) -> list[dict[str, Any]]:
    """Per-rank peaks on a GPU run, from the Trainer's record (tensors only: no baseline)."""
    return [{"rank": rank, "train_peak": peak, "train_peak_seen": True, "baseline": 0, "net": peak, "run_peak": peak}
            for rank, peak in enumerate(timing.get("device_peak_bytes", []))]


def step_times(timing: dict[str, Any]) -> list[dict[str, Any]]:
    """Each step's seconds on rank 0, as the Trainer recorded them (see the docstring)."""
    first = int(timing.get("first_timed_step", 1))
    return [{"step": first + i, "seconds": seconds} for i, seconds in enumerate(timing.get("iteration_s", []))]


def measure(args: argparse.Namespace, workers: int, stage: int, env: dict[str, str]) -> dict[str, Any]:
    """One (workers, stage) pair: its baseline (unless --no-baseline), then the run itself."""
    baseline: dict[int, RankMemory] = {}
    if args.baseline:
        base_run = train(recipe(args, workers, stage, reference=True), args.out, workers, env, args.interval,
                         args.timeout)
        baseline = base_run.ranks
        _tidy(args, base_run.run_dir)
    run = train(recipe(args, workers, stage), args.out, workers, env, args.interval, args.timeout)
    result = outcome(run.run_dir)
    _tidy(args, run.run_dir)
    memory = predicted(args.variant, args.image_size, args.patch_size, args.batch, workers, stage, args.precision)
    if args.device == "cuda":
        ranks = device_rank_rows(result["timing"])
    else:
        ranks = host_rank_rows(run.ranks, baseline)
    worst = max(ranks, key=lambda r: r["net"]) if ranks else None
    times = step_times(result["timing"])
    timed = [t["seconds"] for t in times if t["step"] >= 2]
    step_time = statistics.median(timed) if timed else None
    waits = result["timing"].get("data_s", [])[1:]
    return {
        "workers": workers, "stage": stage,
        "peak": worst["train_peak"] if worst else None, "baseline": worst["baseline"] if worst else None,
        "net": worst["net"] if worst else None, "planned": memory.device_total,
        "ratio": worst["net"] / memory.device_total if worst else None,
        "plan": {"model_states": memory.model_states, "activations": memory.activations, "buffers": memory.buffers,
                 "device_total": memory.device_total},
        "step_time": step_time, "images_per_s": workers * args.batch / step_time if step_time else None,
        "data_s": statistics.median(waits) if waits else None,
        "efficiency": None, "step_times": times, "ranks": ranks, "exit_code": run.code, "wall_s": run.wall_s,
        "log": str(run.log_file), **{k: result[k] for k in ("losses", "losses_finite", "checkpoint_problems")},
    }


def _tidy(args: argparse.Namespace, run_dir: Path) -> None:
    """Checkpoint and consolidated weights are only written because the trainer always saves the
    last step; they are not measured (outcome() has checked them), so they go unless asked."""
    if not args.keep_checkpoints:
        for name in ("checkpoints", "final"):
            shutil.rmtree(run_dir / name, ignore_errors=True)


def add_efficiency(rows: list[dict[str, Any]]) -> None:
    single = {r["stage"]: r["images_per_s"] for r in rows if r["workers"] == 1 and r["images_per_s"]}
    for r in rows:
        if r["images_per_s"] and single.get(r["stage"]):
            r["efficiency"] = r["images_per_s"] / (r["workers"] * single[r["stage"]])


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    width = int(spec.split(".")[0] or 0)
    return f"{value / scale:{spec}}" if value is not None else f"{'-':>{width}}"


def print_table(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    header = (f"{'workers':>7} {'stage':>5} {'peak GiB':>8} {'base GiB':>8} {'net GiB':>7} {'plan GiB':>8} "
              f"{'ratio':>5} {'step s':>7} {'data ms':>7} {'img/s tot':>9} {'scaling':>7}")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        notes = []
        if not r["losses_finite"] or len(r["losses"]) != args.steps:
            notes.append(f"losses {r['losses']}")
        if any(not rank["train_peak_seen"] for rank in r["ranks"]):
            notes.append("last step not seen: run peak")
        if r["exit_code"] != 0:
            notes.append(f"exit {r['exit_code']}")
        print(f"{r['workers']:>7} {r['stage']:>5} {_fmt(r['peak'], '8.3f', GIB)} {_fmt(r['baseline'], '8.3f', GIB)} "
              f"{_fmt(r['net'], '7.3f', GIB)} {_fmt(r['planned'], '8.3f', GIB)} {_fmt(r['ratio'], '5.2f')} "
              f"{_fmt(r['step_time'], '7.3f')} {_fmt(r['data_s'], '7.1f', 1e-3)} {_fmt(r['images_per_s'], '9.2f')} "
              f"{_fmt(r['efficiency'], '7.2f')}"
              + (f"  ({'; '.join(notes)})" if notes else ""))
    if args.device == "cuda":
        basis = "GPU memory allocated by tensors (torch.cuda.max_memory_allocated): net = peak"
    elif args.baseline:
        basis = "net = peak - baseline (minuscule backbone)"
    else:
        basis = "no baseline run: net = peak"
    print(f"\nper-rank training peak (the rank with the largest net); {basis}; ratio = net / planned device total; "
          f"step s = median of steps 2..{args.steps} on rank 0; scaling = img/s total / (workers x img/s total "
          f"at 1 worker, same stage)")


def describe(args: argparse.Namespace, memory: MemoryPlan) -> None:
    largest = getattr(memory.params, "largest_layer", 0)
    where = (f"{args.device_name}" if args.device == "cuda"
             else f"{args.threads} thread(s) per rank, {os.cpu_count()} CPUs")
    print(f"{args.variant} {args.image_size} px, patch {args.patch_size}: {memory.params / 1e6:.1f}M parameters "
          f"(largest layer {largest / 1e6:.2f}M), {args.precision}, batch {args.batch} per rank, {args.steps} steps, "
          f"{where}\n")


def resolve_device(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """`auto` -> cuda when torch sees a GPU; on cuda, one GPU per rank and no baseline runs."""
    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "auto":
        args.device = "cuda" if gpus else "cpu"
    args.device_name = "CPU"
    if args.device == "cuda":
        if not gpus:
            parser.error("--device cuda: torch sees no GPU here")
        if max(args.workers) > gpus:
            parser.error(f"--workers {max(args.workers)}: this machine has {gpus} GPU(s), one per rank")
        args.device_name = f"{gpus} x {torch.cuda.get_device_name(0)}"
        args.baseline = False


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3], choices=[0, 1, 2, 3])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="ranks (processes) per run")
    parser.add_argument("--variant", default="base")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--batch", type=int, default=2, help="images per rank")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run (the first is warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                        help="auto: GPUs when torch sees one (NCCL, GPU memory), else the CPU (gloo, RSS)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--loader-workers", type=int, default=0,
                        help="data loader processes per rank (data.num_workers; 0 = in the training process)")
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the minuscule-backbone baseline runs (ratio then compares the gross peak)")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between memory samples")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per run")
    parser.add_argument("--glibc-default-malloc", action="store_true",
                        help="keep glibc's dynamic mmap threshold (RSS then includes freed heap memory)")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep each run's final checkpoint and consolidated weights")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a new temporary one)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON, help=f"results file (default {DEFAULT_JSON})")
    args = parser.parse_args()
    if args.steps < 2:
        parser.error("--steps must be at least 2 (the first step is warm-up)")
    if min(args.workers) < 1:
        parser.error("--workers must be positive")
    resolve_device(args, parser)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out = (args.out or Path(tempfile.mkdtemp(prefix="beit_zero_scaling_"))).resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    env = environment(args.threads, args.glibc_default_malloc, args.device)
    stages, workers = sorted(set(args.stages)), sorted(set(args.workers))
    rows = []
    for stage in stages:
        for n in workers:
            row = measure(args, n, stage, env)
            rows.append(row)
            log.info("workers %d, ZeRO-%d: peak %s GiB, step %s s, exit %s", n, stage,
                     _fmt(row["peak"], ".3f", GIB), _fmt(row["step_time"], ".3f"), row["exit_code"])
    add_efficiency(rows)

    print()
    describe(args, predicted(args.variant, args.image_size, args.patch_size, args.batch, 1, 0, args.precision))
    print_table(args, rows)
    print(f"logs in {args.out}")
    result = {"variant": args.variant, "image_size": args.image_size, "patch_size": args.patch_size,
              "batch": args.batch, "steps": args.steps, "threads": args.threads, "baseline": args.baseline,
              "device": args.device_name, "precision": args.precision, "loader_workers": args.loader_workers,
              "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_"), "cpu_count": os.cpu_count(),
              "torch": version("torch"), "deepspeed": version("deepspeed"),
              "params": int(predicted(args.variant, args.image_size, args.patch_size, args.batch, 1, 0).params),
              "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    ok = all(r["losses_finite"] and len(r["losses"]) == args.steps and r["step_time"] and r["peak"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
