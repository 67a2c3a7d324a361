"""What the benchmarks that train under torchrun share: the recipe, the environment, the run, and
watching each rank from the outside.

`train()` runs `python -m torch.distributed.run --nproc_per_node=N -m beitdist -v train RECIPE`
(gloo and DS_ACCELERATOR=cpu, or NCCL on GPUs) on a recipe written by `classification_recipe()` (a
BEiT variant with a classification head on digits, 8x8 images upscaled to the image size, fp32 or
bf16, no augmentation). While
it runs, a `Sampler` thread reads every rank's /proc/<pid>/status (VmRSS, VmHWM) and the run's
progress file, so a benchmark can tell the training peak (VmHWM when the last step is done) from the
peak of the whole run (evaluation, checkpoint save, rank 0 consolidating the fp32 weights).
`outcome()` judges the run from what rank 0 wrote, not from the exit code (torch's gloo teardown
sometimes aborts after all work is done), and returns rank 0's timing of each step
(train_result.json's `timing`).

glibc keeps freed heap memory in RSS, which would measure the allocator rather than the tensors;
`environment()` therefore returns large allocations to the system at once (MALLOC_MMAP_THRESHOLD_ =
1 MiB) unless asked for glibc's default.

Imported by the benchmark scripts next to it (`python benchmarks/<script>.py` puts this directory on
sys.path); not part of the beitdist package.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

import beitdist
from beitdist.plan import MemoryPlan, activation_bytes, count_parameters, plan

log = logging.getLogger("rank_runs")

NUM_CLASSES = 10  # digits
MINUSCULE = {"embed_dim": 16, "depth": 1, "num_heads": 1}
"""A reference run's backbone: same pipeline, next to no parameters or activations."""
NO_AUGMENT = {"rand_augment": None, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "hflip": 0.0, "color_jitter": None}


# ------------------------------------------------------------------------------------ the run
def classification_recipe(name: str, output_dir: Path, variant: str, image_size: int, patch_size: int, batch: int,
                          steps: int, zero_stage: int, *, reference: bool = False, val_fraction: float = 0.02,
                          val_batch_size: int = 1, precision: str = "fp32", loader_workers: int = 0
                          ) -> dict[str, Any]:
    """The variant at full size (or the minuscule reference backbone, `reference=True`) with a
    classification head on digits, `precision` (fp32 or bf16), `batch` images per rank, no
    checkpoint before the last step (the trainer always saves the last one, then rank 0
    consolidates it), one evaluation after the last step. `loader_workers` loader processes per
    rank (0: in the training process; a GPU step outruns it)."""
    backbone = {"image_size": image_size, "patch_size": patch_size, **(MINUSCULE if reference else {})}
    return {
        "name": name + ("_reference" if reference else ""),
        "seed": 0,
        "output_dir": str(output_dir),
        "model": {"variant": variant, "backbone": backbone},
        "head": {"name": "classification", "options": {"num_classes": NUM_CLASSES}},
        "data": {"dataset": "digits", "options": {"val_fraction": val_fraction}, "batch_size": batch,
                 "val_batch_size": val_batch_size, "augment": dict(NO_AUGMENT), "num_workers": loader_workers},
        "optim": {"lr": 1e-4, "warmup_steps": 0, "clip_grad": 1.0},
        "engine": {"zero_stage": zero_stage, "precision": precision},
        "train": {"steps": steps, "log_every": 1, "eval_every": 0, "checkpoint_every": 0},
        "tracking": {"enabled": False},
    }


def predicted(variant: str, image_size: int, patch_size: int, batch: int, world: int, stage: int,
              precision: str = "fp32") -> MemoryPlan:
    """beitdist's plan for such a run: no offload, no activation checkpointing, `world` ranks."""
    config = beitdist.variant(variant, image_size=image_size, patch_size=patch_size)
    params = count_parameters(config, "classification", {"num_classes": NUM_CLASSES})
    activations = activation_bytes(config, batch, precision, checkpointing=False)
    return plan(params, world, stage, precision, activations=activations)


def environment(threads: int = 1, glibc_default_malloc: bool = False, device: str = "cpu") -> dict[str, str]:
    """The ranks' environment: DeepSpeed's CPU accelerator (unless `device` is "cuda": DeepSpeed
    then finds the GPUs itself), `threads` OpenMP threads each, unbuffered output, and (unless
    `glibc_default_malloc`) a fixed 1 MiB mmap threshold so freed tensors leave RSS."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1"}
    env.pop("DS_ACCELERATOR", None)  # one exported here (for CPU runs) must not keep a GPU run on the CPU
    if device == "cpu":
        env["DS_ACCELERATOR"] = "cpu"
    if not glibc_default_malloc:
        env["MALLOC_MMAP_THRESHOLD_"] = str(1024 * 1024)
    return env


# ------------------------------------------------------------------------ watching the ranks
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


def peak_in_training(memory: RankMemory) -> int:
    """The training peak, or the run's peak when the last step was never seen."""
    return memory.train_peak if memory.train_peak is not None else memory.peak


class Sampler:
    """Polls the rank processes of a torchrun launcher, and the run's progress file (to see the
    last step done), until the launcher exits."""

    def __init__(self, launcher: subprocess.Popen, nproc: int, progress: Path, steps: int, interval: float) -> None:
        self.launcher, self.nproc, self.progress_file, self.steps = launcher, nproc, progress, steps
        self.interval = interval
        self.ranks: dict[int, RankMemory] = {}
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.start = time.monotonic()

    def _read_progress(self) -> dict[str, Any] | None:
        try:
            progress = json.loads(self.progress_file.read_text())
            int(progress["step"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return progress

    def _poll(self) -> None:
        if len(self.ranks) < self.nproc:
            for pid in descendants(self.launcher.pid):
                rank = rank_of(pid)
                if rank is not None and rank not in self.ranks:
                    self.ranks[rank] = RankMemory(pid)
        progress = self._read_progress()
        done = progress is not None and progress["step"] >= self.steps
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


@dataclass
class RankRun:
    """One torchrun launch as seen from outside."""

    code: int | None
    """The launcher's exit code (judge the run by `outcome()`, not by this)."""
    ranks: dict[int, RankMemory]
    run_dir: Path
    log_file: Path
    wall_s: float


def train(spec: dict[str, Any], out: Path, nproc: int, env: dict[str, str], interval: float = 0.05,
          timeout: float = 3600) -> RankRun:
    """Run a recipe under torchrun (`nproc` ranks) while sampling memory and progress. The recipe,
    and the launcher's output as <name>.log, go into `out`; a run directory left there by an
    earlier launch of the same recipe is removed first (it would be resumed, not run)."""
    from beitdist.distributed import free_port

    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{spec['name']}.yaml"
    path.write_text(yaml.safe_dump(spec))
    run_dir = Path(spec["output_dir"]) / spec["name"]
    if run_dir.exists():
        log.info("removing %s from an earlier launch", run_dir)
        shutil.rmtree(run_dir)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
           f"--master_port={free_port()}", "-m", "beitdist", "-v", "train", str(path)]
    log.info("running %s", " ".join(cmd))
    log_file = out / f"{spec['name']}.log"
    start = time.monotonic()
    with open(log_file, "w") as output:
        launcher = subprocess.Popen(cmd, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=out)
        with Sampler(launcher, nproc, run_dir / "progress.json", spec["train"]["steps"], interval) as sampler:
            try:
                launcher.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s ran past %.0f s; terminating it", spec["name"], timeout)
                launcher.terminate()
                launcher.wait(timeout=60)
    return RankRun(launcher.returncode, sampler.ranks, run_dir, log_file, time.monotonic() - start)


def outcome(run_dir: Path) -> dict[str, Any]:
    """Losses and checkpoint of the run, from what rank 0 wrote (judged from files, not the exit
    code: torch's gloo teardown sometimes aborts after all work is done)."""
    from beitdist.run.checkpoints import LATEST, checkpoint_problems

    result_file = run_dir / "train_result.json"
    result = json.loads(result_file.read_text()) if result_file.exists() else {}
    latest = run_dir / "checkpoints" / LATEST
    tag = latest.read_text().strip() if latest.exists() else None
    problems = checkpoint_problems(run_dir / "checkpoints" / tag) if tag else ["no checkpoint written"]
    losses = result.get("losses", [])
    return {"losses": losses, "losses_finite": bool(losses) and all(math.isfinite(x) for x in losses),
            "checkpoint": str(run_dir / "checkpoints" / tag) if tag else None, "checkpoint_problems": problems,
            "final_dir": result.get("final_dir"), "timing": result.get("timing", {})}
