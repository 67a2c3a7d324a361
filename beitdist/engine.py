"""DeepSpeed: config from the recipe, distributed set-up, engine construction, checkpoints.

beitdist writes every DeepSpeed setting that changes results explicitly (gradient clipping above
all: DeepSpeed >= 0.17 silently defaults it to 1.0), builds ZeRO-3 models under
`deepspeed.zero.Init` so no rank materialises the whole model, and passes its own AdamW (built
from the layer-decay groups) as a client optimizer, which also avoids JIT-building fused Adam.

Checkpoints are DeepSpeed's sharded format plus two things DeepSpeed lacks: a manifest written
after every rank finished (files and sizes, so a truncated checkpoint is detected) and an atomic
`latest` pointer, so a crash mid-save never leaves a `latest` that cannot be loaded.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist

from beitdist.optim import OptimConfig
from beitdist.schema import check

log = logging.getLogger(__name__)

PRESETS: dict[str, dict[str, Any]] = {
    "ddp": {"zero_stage": 0},
    "zero1": {"zero_stage": 1},
    "zero2": {"zero_stage": 2},
    "zero2_offload": {"zero_stage": 2, "offload_optimizer": True},
    "zero3": {"zero_stage": 3},
    "zero3_offload": {"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
}
MANIFEST = "beitdist_manifest.json"
LATEST = "latest"


@dataclass(frozen=True)
class EngineConfig:
    kind: Literal["deepspeed"] = "deepspeed"
    preset: str | None = None
    """Named setting: ddp, zero1, zero2, zero2_offload, zero3, zero3_offload (overrides the fields below)."""
    zero_stage: int = 0
    offload_optimizer: bool = False
    """Keep optimizer states (and the step) on CPU (DeepSpeed CPU Adam; JIT-built on first use)."""
    offload_params: bool = False
    """ZeRO-3 only: keep parameters on CPU between uses."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    grad_accum: int = 1
    activation_checkpointing: bool = False
    zero_init: bool = True
    """Build the model under deepspeed.zero.Init when the stage is 3."""
    raw: dict[str, Any] = field(default_factory=dict)
    """Escape hatch: merged last into the generated DeepSpeed config."""

    def __post_init__(self) -> None:
        if self.preset is not None:
            check(self.preset in PRESETS, "preset", f"got {self.preset!r}; allowed: {', '.join(PRESETS)}")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"expected 0, 1, 2 or 3, got {self.zero_stage}")
        check(self.grad_accum >= 1, "grad_accum", f"expected >= 1, got {self.grad_accum}")
        check(not self.offload_params or self.resolved()["zero_stage"] == 3, "offload_params",
              "parameter offload needs ZeRO stage 3")

    def resolved(self) -> dict[str, Any]:
        """zero_stage / offload_optimizer / offload_params after applying the preset."""
        values = {"zero_stage": self.zero_stage, "offload_optimizer": self.offload_optimizer,
                  "offload_params": self.offload_params}
        if self.preset is not None:
            values.update({"offload_optimizer": False, "offload_params": False}, **PRESETS[self.preset])
        return values

    @property
    def stage(self) -> int:
        return self.resolved()["zero_stage"]


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def deepspeed_config(engine: EngineConfig, optim: OptimConfig, micro_batch: int, world_size: int) -> dict[str, Any]:
    """The DeepSpeed config dict for this recipe (optimizer and scheduler are beitdist's own)."""
    resolved = engine.resolved()
    zero: dict[str, Any] = {"stage": resolved["zero_stage"]}
    if resolved["zero_stage"] > 0:
        zero.update({"contiguous_gradients": True, "overlap_comm": False, "reduce_bucket_size": 5e7})
    if resolved["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if resolved["offload_params"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if resolved["zero_stage"] == 3:
        zero.update({"stage3_gather_16bit_weights_on_model_save": False, "stage3_param_persistence_threshold": 1e4})
    config = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": engine.grad_accum,
        "train_batch_size": micro_batch * engine.grad_accum * world_size,
        "gradient_clipping": float(optim.clip_grad),
        "zero_optimization": zero,
        "bf16": {"enabled": engine.precision == "bf16"},
        "fp16": {"enabled": engine.precision == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": resolved["offload_optimizer"],
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    return _merge(config, engine.raw)


# ---------------------------------------------------------------- distributed
@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    master_addr: str = "127.0.0.1"
    master_port: int = 0

    @classmethod
    def from_env(cls, env: dict[str, str] | os._Environ = os.environ) -> DistInfo:
        """What torchrun / the deepspeed launcher / Ray Train put in the environment (single
        process when absent). Called once at the entry point, never deep inside."""
        return cls(
            rank=int(env.get("RANK", 0)),
            world_size=int(env.get("WORLD_SIZE", 1)),
            local_rank=int(env.get("LOCAL_RANK", 0)),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=int(env.get("MASTER_PORT", 0) or 0),
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device_for(dist_info: DistInfo) -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", dist_info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(dist_info: DistInfo) -> None:
    """Join (or create) the process group: nccl on GPUs, gloo on CPU. DeepSpeed needs one even
    for a single process, so a lone process gets a private group of one."""
    import deepspeed

    if dist.is_initialized():
        deepspeed.init_distributed(dist_backend=dist.get_backend())
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    port = dist_info.master_port or free_port()
    os.environ.update(
        RANK=str(dist_info.rank), WORLD_SIZE=str(dist_info.world_size), LOCAL_RANK=str(dist_info.local_rank),
        LOCAL_SIZE=os.environ.get("LOCAL_SIZE", str(dist_info.world_size)),
        MASTER_ADDR=dist_info.master_addr, MASTER_PORT=str(port),
    )
    if torch.cuda.is_available():
        torch.cuda.set_device(device_for(dist_info))
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)


@contextlib.contextmanager
def model_construction(engine: EngineConfig, ds_config: dict[str, Any]) -> Iterator[None]:
    """Build the model inside this: under ZeRO-3 parameters are partitioned as they are created."""
    if engine.stage == 3 and engine.zero_init:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config, remote_device="cpu" if engine.resolved()["offload_params"] else None):
            yield
    else:
        yield


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a full state dict into a model whose parameters may be ZeRO-3 partitioned, one
    parameter at a time (never the whole model gathered on one rank)."""
    import deepspeed

    for name, tensor in model.named_parameters():
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
            if dist.get_rank() == 0:
                tensor.data.copy_(state[name].to(tensor.dtype))
    for name, buffer in model.named_buffers():
        if name in state:
            buffer.data.copy_(state[name].to(buffer.dtype))


# ----------------------------------------------------------------- checkpoints
def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def finish_checkpoint(ckpt_dir: Path, tag: str) -> Path:
    """After every rank wrote its shard: rank 0 writes the manifest (files and sizes) and swaps
    `latest` atomically. Until then the checkpoint does not count as complete."""
    ckpt_dir = Path(ckpt_dir)
    dist.barrier()
    if dist.get_rank() == 0:
        files = {
            str(p.relative_to(ckpt_dir / tag)): p.stat().st_size for p in sorted((ckpt_dir / tag).rglob("*")) if p.is_file()
        }
        manifest = {"tag": tag, "files": files, "world_size": dist.get_world_size()}
        _write_atomic(ckpt_dir / tag / MANIFEST, json.dumps(manifest, indent=1))
        _write_atomic(ckpt_dir / LATEST, tag)
    dist.barrier()
    return ckpt_dir / tag


def checkpoint_problems(tag_dir: Path) -> list[str]:
    """Why a checkpoint directory cannot be trusted (empty when it is complete)."""
    manifest = tag_dir / MANIFEST
    if not manifest.exists():
        return [f"{tag_dir}: no {MANIFEST} (the save did not finish)"]
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as err:
        return [f"{manifest}: unreadable ({err})"]
    problems = []
    for name, size in files.items():
        path = tag_dir / name
        if not path.exists():
            problems.append(f"{path}: missing")
        elif path.stat().st_size != size:
            problems.append(f"{path}: {path.stat().st_size} bytes, expected {size} (truncated?)")
    return problems


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Tags of complete checkpoints, newest (highest step) first; broken ones are logged and skipped."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    tags = []
    for tag_dir in ckpt_dir.iterdir():
        if not tag_dir.is_dir() or not tag_dir.name.startswith("step_"):
            continue
        problems = checkpoint_problems(tag_dir)
        if problems:
            log.warning("skipping checkpoint %s: %s", tag_dir, "; ".join(problems[:3]))
            continue
        tags.append(tag_dir.name)
    return sorted(tags, key=lambda t: int(t.removeprefix("step_").split("_")[0]), reverse=True)


def saved_world_size(tag_dir: Path) -> int:
    return int(json.loads((Path(tag_dir) / MANIFEST).read_text())["world_size"])


def to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert a checkpoint to DeepSpeed's universal format (for a different world size); returns
    the universal tag, written into `latest_universal`. Runs once, on rank 0."""
    ckpt_dir = Path(ckpt_dir)
    universal = f"{tag}_universal"
    if not (ckpt_dir / universal).exists():
        tmp = ckpt_dir / f".{universal}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(ckpt_dir / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"converting {ckpt_dir / tag} to a universal checkpoint failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, ckpt_dir / universal)
    _write_atomic(ckpt_dir / "latest_universal", universal)
    return universal


def consolidated_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a sharded checkpoint (any ZeRO stage)."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    tag_dir = Path(ckpt_dir) / tag
    if any(tag_dir.glob("*optim_states.pt")):
        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
        # buffers (BatchNorm statistics) are kept in the model-states file
        module = torch.load(next(tag_dir.glob("*model_states.pt")), map_location="cpu", weights_only=False)["module"]
        for key, value in (module or {}).items():
            state.setdefault(key, value.float() if value.is_floating_point() else value)
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    module = torch.load(tag_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
