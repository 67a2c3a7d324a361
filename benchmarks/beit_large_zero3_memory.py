"""Peak memory of each rank training BEiT-L under ZeRO-3 on CPU, against what `beitdist plan` predicts.

Runs `python -m torch.distributed.run --nproc_per_node=N -m beitdist train` (gloo, DS_ACCELERATOR=cpu)
on a recipe written here: the chosen variant at full size with a classification head on digits
(8x8 images upscaled to the image size), fp32, ZeRO-3, batch 1 per rank, a checkpoint at the last
step. The parent samples every rank's /proc/<pid>/status (VmRSS, VmHWM) and reads the run's
progress file, so it can tell the training peak (VmHWM when the last step is done) from the peak of
the whole run (evaluation, checkpoint save, and rank 0 consolidating the fp32 weights afterwards,
which builds the whole model once more).

What is compared: each rank's training peak minus a baseline against the planner's model-state
share (ZeRO-3 fp32: 16 B a parameter / world, plus the gathered largest layer) plus activations,
and against its full device total (plus gradient bucket, parameters ZeRO-3 keeps gathered, and the
overhead factor). The baseline is the same run with a minuscule backbone (width 16, one block, same
image size, data, world and engine): what a rank costs before the model (Python, torch, DeepSpeed,
gloo, the data pipeline). glibc keeps freed heap memory in RSS, which would measure the allocator rather
than the tensors; large allocations are therefore returned to the system at once
(MALLOC_MMAP_THRESHOLD_=1 MiB) unless --glibc-default-malloc is given.

    python benchmarks/beit_large_zero3_memory.py                          # BEiT-L, 224 px, 3 steps
    python benchmarks/beit_large_zero3_memory.py --variant tiny --image-size 64 --out /tmp/mem
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Any

from _rank_runs import (RankMemory, classification_recipe, environment, outcome, peak_in_training, predicted,
                        train)
from beitdist.plan import GIB, MemoryPlan

log = logging.getLogger("beit_large_zero3_memory")


def recipe(args: argparse.Namespace, reference: bool = False) -> dict[str, Any]:
    """The run: full-size backbone (or the minuscule reference), fp32 ZeRO-3, one image per rank,
    a checkpoint at the last step, one validation image at a time so evaluation never outgrows
    training."""
    return classification_recipe(f"{args.variant}_zero3_memory", args.out / "runs", args.variant, args.image_size,
                                 args.patch_size, args.batch, args.steps, 3, reference=reference)


def describe_plan(args: argparse.Namespace, memory: MemoryPlan) -> None:
    largest = getattr(memory.params, "largest_layer", 0)
    unscaled = memory.model_states + memory.buffers + memory.activations
    print(f"{args.variant} {args.image_size} px, patch {args.patch_size}: {memory.params / 1e6:.1f}M parameters "
          f"(largest layer {largest / 1e6:.2f}M), ZeRO-3 fp32, {args.nproc} ranks, batch {args.batch} per rank, "
          f"{args.steps} steps")
    print(f"planner per rank: model states {memory.model_states / GIB:.3f} GiB (16 B x params / {args.nproc} + "
          f"gathered layer {memory.gathered / GIB:.3f}), activations {memory.activations / GIB:.3f}, buffers "
          f"{memory.buffers / GIB:.3f} => device total {memory.device_total / GIB:.3f} GiB "
          f"(x{memory.device_total / unscaled:.2f} overhead)")
    print("baseline: the same run with a minuscule backbone (its training peak, per rank)\n")


def rank_row(rank: int, measured: RankMemory, baseline: RankMemory | None, memory: MemoryPlan) -> dict[str, Any]:
    states = memory.model_states + memory.activations
    train_peak = peak_in_training(measured)
    base = peak_in_training(baseline) if baseline is not None else 0
    net = train_peak - base
    return {"rank": rank, "train_peak": train_peak, "baseline": base, "net": net, "run_peak": measured.peak,
            "predicted_states_activations": states, "ratio_states": net / states,
            "predicted_total": memory.device_total, "ratio_total": net / memory.device_total,
            "train_peak_seen": measured.train_peak is not None}


def report(args: argparse.Namespace, memory: MemoryPlan, baseline: dict[int, RankMemory],
           ranks: dict[int, RankMemory], run: dict[str, Any]) -> list[dict[str, Any]]:
    describe_plan(args, memory)
    header = (f"{'rank':>4} {'train peak':>10} {'baseline':>8} {'net':>7} {'states+act':>10} {'ratio':>6} "
              f"{'plan total':>10} {'ratio':>6} {'run peak':>9}")
    print(header + "\n" + "-" * len(header))
    rows = [rank_row(rank, m, baseline.get(rank), memory) for rank, m in sorted(ranks.items())]
    for r in rows:
        print(f"{r['rank']:>4} {r['train_peak'] / GIB:10.3f} {r['baseline'] / GIB:8.3f} {r['net'] / GIB:7.3f} "
              f"{r['predicted_states_activations'] / GIB:10.3f} {r['ratio_states']:6.2f} "
              f"{r['predicted_total'] / GIB:10.3f} {r['ratio_total']:6.2f} {r['run_peak'] / GIB:9.3f}"
              + ("" if r["train_peak_seen"] else "  (last step not seen: run peak)"))
    print("\nGiB; net = train peak - baseline; ratio = net / prediction; run peak includes the checkpoint save "
          "and (rank 0) consolidation")
    print(f"losses: {', '.join(f'{x:.4f}' for x in run['losses']) or 'none'} (finite: {run['losses_finite']})")
    problems = run["checkpoint_problems"]
    status = f"(problems: {'; '.join(problems)})" if problems else "(complete)"
    print(f"checkpoint: {run['checkpoint'] or 'none'} {status}")
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="large")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="images per rank")
    parser.add_argument("--nproc", type=int, default=2, help="ranks (processes)")
    parser.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS per rank")
    parser.add_argument("--interval", type=float, default=0.05, help="seconds between memory samples")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--glibc-default-malloc", action="store_true",
                        help="keep glibc's dynamic mmap threshold (RSS then includes freed heap memory)")
    parser.add_argument("--out", type=Path, default=None, help="run directory (default: a new temporary one)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.out = (args.out or Path(tempfile.mkdtemp(prefix="beit_zero3_memory_"))).resolve()
    args.out.mkdir(parents=True, exist_ok=True)

    memory = predicted(args.variant, args.image_size, args.patch_size, args.batch, args.nproc, 3)
    env = environment(args.threads, args.glibc_default_malloc)
    baseline = train(recipe(args, reference=True), args.out, args.nproc, env, args.interval, args.timeout).ranks
    measured = train(recipe(args), args.out, args.nproc, env, args.interval, args.timeout)
    code, ranks = measured.code, measured.ranks
    run = outcome(measured.run_dir)
    if not ranks:
        print(f"no rank process was seen; see the logs in {args.out}", file=sys.stderr)
        return 1
    rows = report(args, memory, baseline, ranks, run)
    print(f"launcher exit code {code}; logs in {args.out}")
    result = {"variant": args.variant, "image_size": args.image_size, "patch_size": args.patch_size,
              "steps": args.steps, "batch": args.batch, "nproc": args.nproc, "params": int(memory.params),
              "plan": {"model_states": memory.model_states, "activations": memory.activations,
                                             "buffers": memory.buffers, "device_total": memory.device_total},
              "ranks": rows, "exit_code": code, "malloc_mmap_threshold": env.get("MALLOC_MMAP_THRESHOLD_"), **run,
              "rss_samples": {r: m.samples for r, m in ranks.items()},
              "baseline_rss_samples": {r: m.samples for r, m in baseline.items()}}
    (args.out / "result.json").write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out / 'result.json'}")
    ok = run["losses_finite"] and not run["checkpoint_problems"] and len(run["losses"]) == args.steps
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
