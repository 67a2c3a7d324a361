"""How much of the cluster a trial takes, and how many trials run at once.

Ray Tune does not see the resources of the Ray Train workers a trial starts (Ray Train V2 runs
them outside the trial's own reservation), so without a limit Tune starts every trial and their
worker groups wait on each other for resources. The sweep therefore reserves, per worker, what
`beitdist plan` says a rank needs, and runs as many trials at once as the cluster's nodes hold:

- CPU training: Ray's `memory` resource = the plan's per-rank bytes (the "device" is the host)
  plus the host offload, plus what a worker process costs before any model (`PROCESS_GIB`);
- GPU training: whole GPUs per worker; a one-worker trial whose plan fits several times in
  `scaling.gpu_memory_gb` gets a fraction of a GPU, so that many trials share one (a worker group of
  several ranks never does: two ranks of one run on one GPU would break NCCL).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from beitdist.plan import GIB
from beitdist.recipe import Recipe
from beitdist.sweep.spec import SweepError

PROCESS_GIB = 1.0
"""Host memory of a Ray Train worker before its model: Python, torch, DeepSpeed, the data loader
(about 0.8 GiB resident measured for the digits quickstart on CPU)."""
DRIVER_GIB = 0.5
"""Host memory of a trial's own Tune actor, which only drives Ray Train (Ray needs a non-empty
reservation for it; CPUs are left to the workers)."""
MAX_GPU_SHARE = 8
"""At most this many one-worker trials share one GPU."""
_EPS = 1e-9


@dataclass(frozen=True)
class TrialResources:
    workers: int
    per_worker: dict[str, float]
    """Ray resources of each worker (CPU, GPU, memory in bytes, the recipe's custom ones)."""
    planned_gib: float
    """The plan's per-rank device memory."""
    spread: bool
    """STRICT_SPREAD: each worker on its own node."""

    def describe(self) -> str:
        parts = [f"{name} {amount / GIB:.1f} GiB" if name == "memory" else f"{name} {amount:g}"
                 for name, amount in self.per_worker.items()]
        return f"{self.workers} worker{'s' if self.workers > 1 else ''} x {{{', '.join(parts)}}}"


@dataclass(frozen=True)
class Packing:
    resources: TrialResources
    concurrent: int
    nodes: list[dict[str, float]]

    def describe_cluster(self) -> str:
        totals: dict[str, float] = {}
        for node in self.nodes:
            for name, amount in node.items():
                totals[name] = totals.get(name, 0.0) + amount
        shown = [f"{name} {totals[name] / GIB:.1f} GiB" if name == "memory" else f"{name} {totals[name]:g}"
                 for name in ("CPU", "GPU", "memory") if totals.get(name)]
        return f"{len(self.nodes)} node{'s' if len(self.nodes) > 1 else ''} ({', '.join(shown)})"


def trial_resources(recipe: Recipe, use_gpu: bool) -> TrialResources:
    """What one trial of `recipe` reserves (see the module docstring)."""
    from beitdist.launcher import make_plan

    plan = make_plan(recipe, use_gpu)
    scaling = recipe.scaling
    per_worker = {"CPU": 1.0, **{k: float(v) for k, v in scaling.resources_per_worker.items()}}
    if use_gpu:
        gpus = per_worker.get("GPU", 1.0)
        device = scaling.gpu_memory_gb
        if scaling.num_workers == 1 and gpus == 1.0 and device and plan.per_rank_gib > 0:
            share = min(MAX_GPU_SHARE, int(device // plan.per_rank_gib))
            gpus = 1.0 / share if share > 1 else 1.0
        per_worker["GPU"] = gpus
        host = plan.host_gib + PROCESS_GIB
    else:
        per_worker.pop("GPU", None)
        host = plan.per_rank_gib + plan.host_gib + PROCESS_GIB
    per_worker.setdefault("memory", math.ceil(host * GIB))
    spread = scaling.placement_strategy == "STRICT_SPREAD"
    return TrialResources(scaling.num_workers, per_worker, plan.per_rank_gib, spread)


def largest(resources: Sequence[TrialResources]) -> TrialResources:
    """The trial that needs the most (the sweep reserves for the largest: a searched batch size
    or model width changes the plan)."""
    return max(resources, key=lambda r: (r.workers, r.per_worker.get("GPU", 0.0), r.per_worker.get("memory", 0.0),
                                         r.per_worker.get("CPU", 0.0)))


def worker_slots(node: Mapping[str, float], per_worker: Mapping[str, float]) -> int:
    """How many workers of this size the node holds."""
    counts = [math.floor(node.get(name, 0.0) / amount + _EPS) for name, amount in per_worker.items() if amount > 0]
    return min(counts) if counts else 0


def pack(resources: TrialResources, nodes: list[dict[str, float]], trials: int, max_concurrent: int | None) -> Packing:
    """How many trials run at once; SweepError when a trial fits nowhere (what it needs, what the
    largest node has)."""
    slots = [worker_slots(node, resources.per_worker) for node in nodes]
    usable = sum(1 for s in slots if s > 0) if resources.spread else sum(slots)
    if usable < resources.workers:
        biggest = max(nodes, key=lambda n: worker_slots(n, {k: v for k, v in resources.per_worker.items()
                                                           if k != "memory"}), default={})
        has = ", ".join(f"{k} {biggest.get(k, 0.0) / GIB:.1f} GiB" if k == "memory" else f"{k} {biggest.get(k, 0.0):g}"
                        for k in resources.per_worker)
        where = "nodes (STRICT_SPREAD)" if resources.spread else "worker slots"
        raise SweepError(f"a trial needs {resources.describe()} (plan: {resources.planned_gib:.2f} GiB per rank); "
                         f"the cluster has {usable} such {where} across {len(nodes)} node(s), the largest with {has}: "
                         "lower scaling.num_workers or data.batch_size, or add nodes")
    concurrent = min(sum(slots) // resources.workers, trials)
    memory = sum(node.get("memory", 0.0) for node in nodes)
    per_trial = resources.workers * resources.per_worker.get("memory", 0.0) + DRIVER_GIB * GIB
    concurrent = min(concurrent, int(memory // per_trial))
    if max_concurrent is not None:
        concurrent = min(concurrent, max_concurrent)
    return Packing(resources, max(concurrent, 1), nodes)


def driver_resources() -> dict[str, float]:
    """The reservation of a trial's Tune actor (see DRIVER_GIB)."""
    return {"CPU": 0.0, "memory": float(math.ceil(DRIVER_GIB * GIB))}


def cluster_nodes() -> list[dict[str, float]]:
    """The alive nodes' Ray resources (Ray must be initialised)."""
    import ray

    return [{k: float(v) for k, v in node["Resources"].items() if not k.startswith("node:")}
            for node in ray.nodes() if node.get("Alive")]


def this_machine(num_cpus: int | None = None) -> list[dict[str, float]]:
    """This machine as the one node a local Ray instance would make (for `--dry-run` without a
    cluster): its CPUs, GPUs and Ray's default share (70%) of the memory available now."""
    import torch

    node: dict[str, float] = {"CPU": float(num_cpus or os.cpu_count() or 1)}
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        node["GPU"] = float(gpus)
    node["memory"] = 0.7 * _available_memory()
    return [node]


def _available_memory() -> float:
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: line.split()[1] for line in f}
        return float(info["MemAvailable"]) * 1024
    except (OSError, KeyError, IndexError, ValueError):
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))

