"""Running recipes as separate processes (torchrun with gloo), for the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from beitdist.distributed import free_port

TINY_RECIPE: dict[str, Any] = {
    "name": "tiny",
    "seed": 0,
    "model": {"variant": "tiny", "backbone": {"embed_dim": 32, "depth": 2, "num_heads": 2, "image_size": 16,
                                               "patch_size": 4, "drop_path_rate": 0.1}},
    "head": {"name": "classification", "options": {"num_classes": 10}},
    "data": {"dataset": "digits", "batch_size": 8, "val_batch_size": 128,
             "augment": {"rand_augment": None, "mixup": 0.0, "cutmix": 0.0, "reprob": 0.0, "hflip": 0.0,
                         "color_jitter": None, "scale": [0.6, 1.0]}},
    "optim": {"lr": 3e-3, "warmup_steps": 2, "clip_grad": 1.0},
    "engine": {"zero_stage": 0},
    "train": {"steps": 6, "log_every": 1},
    # MLflow costs seconds per run (import, sqlite migration); tests/test_tracking.py and the
    # launch end-to-end test (tests/test_faults.py) cover it
    "tracking": {"enabled": False},
}


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


TRAIN_ENV = {"DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def train_command(recipe_file: Path, nproc: int) -> list[str]:
    """`beitdist -v train FILE` on `nproc` gloo ranks (torchrun; a plain process for 1)."""
    if nproc == 1:
        return [sys.executable, "-m", "beitdist", "-v", "train", str(recipe_file)]
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--master_port={free_port()}", "-m", "beitdist", "-v", "train", str(recipe_file)]


def start_torchrun(recipe_file: Path, cwd: Path, nproc: int = 2) -> subprocess.Popen:
    """`train_command` started, not waited for (the kill and pre-emption tests signal its ranks,
    `child_pids`); stdout and stderr piped as text."""
    return subprocess.Popen(train_command(recipe_file, nproc), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **TRAIN_ENV}, cwd=cwd)


def run_recipe(recipe: dict[str, Any], tmp_path: Path, nproc: int = 2, timeout: int = 300,
               expect_ok: bool = True) -> subprocess.CompletedProcess:
    """`beitdist train` on `nproc` gloo ranks (plain process for 1); output under tmp_path/runs
    unless the recipe names its output_dir."""
    if "output_dir" not in recipe:
        recipe = merge(recipe, {"output_dir": str(tmp_path / "runs")})
    path = tmp_path / f"{recipe['name']}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    cmd = train_command(path, nproc)
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **TRAIN_ENV}, timeout=timeout,
                            cwd=tmp_path)
    if expect_ok and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}")
    return result


def result_of(recipe: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    return json.loads((tmp_path / "runs" / recipe["name"] / "train_result.json").read_text())


def progress_step(run_dir: Path) -> int:
    """The step rank 0's progress file says (0 before it exists or while it is rewritten)."""
    try:
        return int(json.loads((run_dir / "progress.json").read_text())["step"])
    except (OSError, ValueError, KeyError):
        return 0


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is `pid` (torchrun's ranks), from /proc."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children
