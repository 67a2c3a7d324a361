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
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import beitdist
from beitdist.plan import GIB, MemoryPlan, activation_bytes, count_parameters, plan

log = logging.getLogger("beit_large_zero3_memory")

NUM_CLASSES = 10  # digits
MINUSCULE = {"embed_dim": 16, "depth": 1, "num_heads": 1}
"""The reference run's backbone: same pipeline, next to no parameters or activations."""


def recipe(args: argparse.Namespace, reference: bool = False) -> dict[str, Any]:
    """The run: full-size backbone (or the minuscule reference), fp32 ZeRO-3, one image per rank,
    a checkpoint at the last step, one validation image at a time so evaluation never outgrows
    training."""
    backbone = {"image_size": args.image_size, "patch_size": args.patch_size, **(MINUSCULE if reference else {})}
    return {
        "name": f"{args.variant}_zero3_memory" + ("_reference" if reference else ""),
        "seed": 0,
        "output_dir": str(args.out / "runs"),
        "model": {"variant": args.variant, "backbone": backbone},
        "head": {"name": "classification", "options": {"num_classes": NUM_CLASSES}},
        "data": {"dataset": "digits", "options": {"val_fraction": 0.02}, "batch_size": args.batch,
                 "val_batch_size": 1,
                 "augment": {"rand_augment": None, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "hflip": 0.0,
                             "color_jitter": None}},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "clip_grad": 1.0},
        "engine": {"zero_stage": 3, "precision": "fp32"},
        "train": {"steps": args.steps, "log_every": 1, "eval_every": 0, "checkpoint_every": 0},
        "tracking": {"enabled": False},
    }


def predicted(args: argparse.Namespace) -> MemoryPlan:
    """beitdist's plan for this run: ZeRO-3, fp32, no offload, `nproc` ranks."""
    config = beitdist.variant(args.variant, image_size=args.image_size, patch_size=args.patch_size)
    params = count_parameters(config, "classification", {"num_classes": NUM_CLASSES})
    activations = activation_bytes(config, args.batch, "fp32", checkpointing=False)
    return plan(params, args.nproc, 3, "fp32", activations=activations)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process in bytes (empty once it has exited)."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return {}
    fields = (line.partition(":") for line in lines)
    return {key: int(value.split()[0]) * 1024 for key, _, value in fields if key in ("VmRSS", "VmHWM")}


def rank_of(pid: int) -> int | None:
    """The RANK torchrun gave a worker (None for the launcher itself or any other process)."""
    try:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    if b"torch.distributed.run" in cmdline:
        return None
    value = next((e[5:] for e in environ if e.startswith(b"RANK=")), None)
    return int(value) if value is not None else None


def descendants(root: int) -> list[int]:
    """Every process below `root` (children of children too), from /proc's parent links."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        children = parents.get(todo.pop(), [])
        found.extend(children)
        todo.extend(children)
    return found


@dataclass
class RankMemory:
    pid: int
    peak: int = 0
    """VmHWM last seen: the peak of the whole run (sampling misses at most its last interval)."""
    train_peak: int | None = None
    """VmHWM when the progress file first showed the last step."""
    samples: list[tuple[float, int]] = field(default_factory=list)


class Sampler:
    """Polls the rank processes of a torchrun launcher until it exits."""

    def __init__(self, launcher: subprocess.Popen, nproc: int, progress: Path, steps: int, interval: float) -> None:
        self.launcher, self.nproc, self.progress, self.steps = launcher, nproc, progress, steps
        self.interval = interval
        self.ranks: dict[int, RankMemory] = {}
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.start = time.monotonic()

    def _final_step_done(self) -> bool:
        try:
            return json.loads(self.progress.read_text())["step"] >= self.steps
        except (OSError, ValueError, KeyError):
            return False

    def _poll(self) -> None:
        if len(self.ranks) < self.nproc:
            for pid in descendants(self.launcher.pid):
                rank = rank_of(pid)
                if rank is not None and rank not in self.ranks:
                    self.ranks[rank] = RankMemory(pid)
        done = self._final_step_done()
        for memory in self.ranks.values():
            status = proc_status(memory.pid)
            if not status:
                continue
            memory.peak = max(memory.peak, status["VmHWM"])
            memory.samples.append((round(time.monotonic() - self.start, 2), status["VmRSS"]))
            if done and memory.train_peak is None:
                memory.train_peak = status["VmHWM"]

    def _loop(self) -> None:
        while self.launcher.poll() is None:
            self._poll()
            time.sleep(self.interval)

    def __enter__(self) -> Sampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.thread.join()


def environment(args: argparse.Namespace) -> dict[str, str]:
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    if not args.glibc_default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(1024 * 1024)
    return env


def train(spec: dict[str, Any], args: argparse.Namespace,
          env: dict[str, str]) -> tuple[int, dict[int, RankMemory], Path]:
    """Run a recipe under torchrun while sampling memory; returns the exit code, memory per rank
    and the run directory."""
    from beitdist.engine import free_port

    path = args.out / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_dir = args.out / "runs" / spec["name"]
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
           f"--master_port={free_port()}", "-m", "beitdist", "-v", "train", str(path)]
    log.info("running %s", " ".join(cmd))
    with open(args.out / f"{spec['name']}.log", "w") as output:
        launcher = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=args.out)
        with Sampler(launcher, args.nproc, run_dir / "progress.json", args.steps, args.interval) as sampler:
            try:
                launcher.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                launcher.terminate()
                launcher.wait(timeout=60)
    return launcher.returncode, sampler.ranks, run_dir


def outcome(run_dir: Path) -> dict[str, Any]:
    """Losses and checkpoint of the run, from what rank 0 wrote (judged from files, not the exit
    code: torch's gloo teardown sometimes aborts after all work is done)."""
    from beitdist.run_checkpoints import LATEST, checkpoint_problems

    result_file = run_dir / "train_result.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    latest = run_dir / "checkpoints" / LATEST
    tag = latest.read_text().strip() if latest.exists() else None
    problems = checkpoint_problems(run_dir / "checkpoints" / tag) if tag else ["no checkpoint written"]
    losses = result.get("losses", [])
    return {"losses": losses, "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
            "checkpoint": str(run_dir / "checkpoints" / tag) if tag else None, "checkpoint_problems": problems,
            "final_dir": result.get("final_dir")}


def peak_in_training(memory: RankMemory) -> int:
    return memory.train_peak if memory.train_peak is not None else memory.peak


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

    memory = predicted(args)
    env = environment(args)
    _, baseline, _ = train(recipe(args, reference=True), args, env)
    code, ranks, run_dir = train(recipe(args), args, env)
    run = outcome(run_dir)
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
