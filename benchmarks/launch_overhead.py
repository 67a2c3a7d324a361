"""End-to-end launch: seconds from `beitdist launch` to the first finished step, and steady-state
images/s against the same training steps without the framework.

Runs `beitdist launch RECIPE` (the quickstart by default: 2 Ray workers, DeepSpeed ZeRO-2, gloo on
CPU) as a subprocess into a temporary output dir, then reads what the run wrote:

- `launch.json` (the launcher): when `launch()` started and when Ray was up;
- `workers/rank_0.json` (each worker): when the training function started in its Ray actor;
- `train_result.json` (rank 0): when set-up (process group, DeepSpeed, data, model) was done,
  when the first step finished, and the seconds of every loop iteration without its evaluation
  and checkpoint (data loading, forward, backward, DeepSpeed's reduction and step, callbacks,
  MLflow, progress, the report to Ray all count).

Time to first step = first step finished - this script's Popen (CLI start-up, recipe checks, Ray,
workers, set-up, step 1); "after Ray is up" starts at `ray_ready_at`. Steady state = global batch /
median iteration seconds over the iterations after `--skip` (the first ones warm allocators and
gloo). The bare reference runs the same model (from the same recipe), with the same AdamW groups
and per-rank batch, as `num_workers` plain processes at once with the threads a Ray worker gets
(cores / workers) on one pre-made batch each, with no data loading, no gradient reduction and no
framework: their summed images/s is what the hardware gives this work. Overhead =
1 - end-to-end / bare. A second bare run all-reduces the gradients (gloo, one flat buffer per step,
as DDP with one bucket): what data parallelism itself costs here (the ranks also wait for each other),
so the overhead beyond it is the framework's own (data loading, DeepSpeed's ZeRO bookkeeping, Ray).

    python benchmarks/launch_overhead.py                                # quickstart, 120 steps
    python benchmarks/launch_overhead.py --steps 60 --set data.batch_size=64
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TARGET_FIRST_STEP_S = 15.0
TARGET_OVERHEAD = 0.10


def run_launch(args: argparse.Namespace, output_dir: Path) -> tuple[float, dict[str, Any]]:
    """`beitdist launch` into output_dir; returns the Popen time and the run's records."""
    overrides = [f"output_dir={output_dir}", f"train.steps={args.steps}", "train.eval_every=0",
                 "train.checkpoint_every=0", *args.set]
    cmd = [sys.executable, "-m", "beitdist", "launch", str(args.recipe)]
    for override in overrides:
        cmd += ["--set", override]
    popen_at = time.time()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"beitdist launch failed ({done.returncode}):\n{done.stderr[-4000:]}")
    runs = [p for p in output_dir.iterdir() if (p / "train_result.json").exists()]
    if len(runs) != 1:
        raise SystemExit(f"expected one finished run under {output_dir}, found {len(runs)}")
    run_dir = runs[0]
    records = {"launch": json.loads((run_dir / "launch.json").read_text()),
               "rank0": json.loads((run_dir / "workers" / "rank_0.json").read_text()),
               "result": json.loads((run_dir / "train_result.json").read_text())}
    records["result"].pop("losses", None)
    return popen_at, records


def bare_worker(rank: int, world: int, port: int, reduce: bool, recipe_path: str, overrides: list[str],
                threads: int, steps: int, warmup: int, queue: mp.Queue) -> None:
    """One rank's training steps with nothing around them (see the module docstring); with
    `reduce`, the gradients are averaged over the ranks (one flat gloo all-reduce per step, as DDP
    does with one bucket), which is what data parallelism itself costs on this machine."""
    import torch
    import torch.distributed as dist

    from beitdist.model import build_model
    from beitdist.optim import build_adamw, param_groups
    from beitdist.recipe import load_recipe

    torch.set_num_threads(threads)
    if reduce:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    recipe = load_recipe(recipe_path, overrides)
    config = recipe.model.backbone_config()
    torch.manual_seed(0)
    model = build_model(config, recipe.head.name, recipe.head.options).train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_adamw(param_groups(model, recipe.optim), recipe.optim)
    batch = recipe.data.batch_size
    pixels = torch.randn(batch, config.in_chans, *config.image_size)
    labels = torch.randint(0, recipe.head.options.get("num_classes", 10), (batch,))
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=False)
        out = model(pixels)
        torch.nn.functional.cross_entropy(out.logits, labels).backward()
        if reduce:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            dist.all_reduce(flat)
            flat /= world
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset:offset + p.numel()].view_as(p))
                offset += p.numel()
        if recipe.optim.clip_grad:
            torch.nn.utils.clip_grad_norm_(params, recipe.optim.clip_grad)
        optimizer.step()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    queue.put(batch / statistics.median(times))
    if reduce:
        dist.destroy_process_group()


def run_bare(args: argparse.Namespace, num_workers: int, reduce: bool) -> list[float]:
    """`num_workers` bare ranks at once; each one's images/s."""
    from beitdist.distributed import free_port

    threads = max(1, (os.cpu_count() or 1) // num_workers)  # what the launcher gives a Ray worker
    context = mp.get_context("spawn")
    queue = context.Queue()
    port = free_port()
    procs = [context.Process(target=bare_worker, args=(rank, num_workers, port, reduce, str(args.recipe), args.set,
                                                       threads, args.bare_steps, 5, queue))
             for rank in range(num_workers)]
    for proc in procs:
        proc.start()
    rates = [queue.get(timeout=args.timeout) for _ in procs]
    for proc in procs:
        proc.join()
    return rates


def report(args: argparse.Namespace, popen_at: float, records: dict[str, Any], bare: list[float],
           reduced: list[float]) -> dict[str, Any]:
    launch, rank0, result = records["launch"], records["rank0"], records["result"]
    timing = result["timing"]
    iterations = timing["iteration_s"][args.skip:]
    e2e = result["images_per_step"] / statistics.median(iterations)
    data_wait = statistics.median(timing.get("data_s", [])[args.skip:] or [0.0])
    bare_total = sum(bare)
    phases = {
        "CLI start-up and recipe checks": launch["started_at"] - popen_at,
        "Ray up (local instance)": launch["ray_ready_at"] - launch["started_at"],
        "Ray Train starts the workers": rank0["started"] - launch["ray_ready_at"],
        "set-up (process group, DeepSpeed, data, model)": timing["setup_done_at"] - rank0["started"],
        "first step": timing["first_step_done_at"] - timing["setup_done_at"],
    }
    out = {
        "recipe": str(args.recipe), "steps": args.steps, "overrides": args.set,
        "num_workers": launch["num_workers"], "global_batch": result["images_per_step"], "phases_s": phases,
        "first_step_s": timing["first_step_done_at"] - popen_at,
        "first_step_after_ray_s": timing["first_step_done_at"] - launch["ray_ready_at"],
        "e2e_images_per_s": e2e, "median_iteration_s": statistics.median(iterations), "median_data_s": data_wait,
        "bare_images_per_s_per_rank": bare, "bare_images_per_s": bare_total, "overhead": 1 - e2e / bare_total,
        "bare_allreduce_images_per_s": sum(reduced), "overhead_beyond_allreduce": 1 - e2e / sum(reduced),
    }
    print(f"{args.recipe}: {out['num_workers']} workers, global batch {out['global_batch']}, {args.steps} steps")
    for name, seconds in phases.items():
        print(f"  {name:48} {seconds:6.1f} s")
    print(f"first step after `beitdist launch`: {out['first_step_s']:.1f} s; after Ray is up: "
          f"{out['first_step_after_ray_s']:.1f} s (target <= {TARGET_FIRST_STEP_S:.0f} s)")
    print(f"steady state: {e2e:.1f} img/s end to end vs {bare_total:.1f} img/s bare "
          f"({' + '.join(f'{r:.1f}' for r in bare)}): overhead {100 * out['overhead']:.1f}% "
          f"(target <= {100 * TARGET_OVERHEAD:.0f}%)")
    print(f"  rank 0 waited {1000 * data_wait:.1f} ms of its {1000 * out['median_iteration_s']:.1f} ms iterations "
          f"for its input (median; `data_s` in train_result.json)")
    print(f"  bare with the gradients all-reduced (gloo, one flat buffer): {sum(reduced):.1f} img/s; the framework "
          f"beyond that: {100 * out['overhead_beyond_allreduce']:.1f}%")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", type=Path, default=Path("recipes/quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--skip", type=int, default=10, help="iterations left out of the steady state")
    parser.add_argument("--bare-steps", type=int, default=40)
    parser.add_argument("--set", action="append", default=[], help="recipe override, as `beitdist launch --set`")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", type=Path, default=Path("benchmarks/results/launch_overhead.json"))
    args = parser.parse_args()
    if args.steps <= args.skip + 5:
        parser.error(f"--steps must exceed --skip + 5 (got {args.steps} and {args.skip})")

    with tempfile.TemporaryDirectory() as tmp:
        popen_at, records = run_launch(args, Path(tmp))
    workers = records["launch"]["num_workers"]
    bare, reduced = run_bare(args, workers, reduce=False), run_bare(args, workers, reduce=True)
    out = report(args, popen_at, records, bare, reduced)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
