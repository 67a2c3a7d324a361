"""The engine section of the recipe, DeepSpeed's config, and the distributed set-up.

Two training engines implement one interface (`beitdist.engines`): DeepSpeed (ZeRO 0-3, the
default) and fairscale (`engine.backend: fairscale`; OSS + ShardedDataParallel, or
FullyShardedDataParallel on GPUs). This module holds what both need (EngineConfig, DistInfo,
init_distributed) and DeepSpeed's config.

beitdist writes every DeepSpeed setting that changes results explicitly (gradient clipping above
all: DeepSpeed >= 0.17 silently defaults it to 1.0), builds ZeRO-3 models under
`deepspeed.zero.Init` so no rank materialises the whole model, and passes its own AdamW (built
from the layer-decay groups) as a client optimizer, which also avoids JIT-building fused Adam.

A run's checkpoint directory (commit, resume, pruning, failed saves) is `beitdist.run_checkpoints`.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist

from beitdist.deepspeed_import import import_deepspeed
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


BACKENDS = ("deepspeed", "fairscale")
FAIRSCALE_MODES = ("oss", "fsdp")


@dataclass(frozen=True)
class EngineConfig:
    backend: Literal["deepspeed", "fairscale"] = "deepspeed"
    """Training engine: deepspeed (ZeRO 0-3, offload) or fairscale (`pip install beitdist[fairscale]`;
    for machines where DeepSpeed's JIT-built ops or pinned toolchains are not an option)."""
    fairscale_mode: Literal["oss", "fsdp"] = "oss"
    """fairscale only: oss (optimizer state sharded, gradients reduced to their owner: ZeRO-1/2
    style; CPU and GPU) or fsdp (FullyShardedDataParallel, parameters sharded too: GPU only)."""
    offload_activations: bool = False
    """fairscale only, with activation_checkpointing: keep the checkpointed activations on CPU
    (checkpoint_wrapper's offload_to_cpu)."""
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
    compile: bool = False
    """torch.compile the model (inductor) once the engine has wrapped it: layer norms, GELU,
    softmax, biases and residual adds fused into few kernels. The first training and the first
    evaluation step compile (tens of seconds on a GPU, minutes on a small CPU); weights,
    checkpoints and parameter names are unchanged."""
    tf32: bool = False
    """GPUs (A100 and later) only: fp32 matmuls in TensorFloat-32 (10-bit mantissa), several times
    faster for fp32 runs; false leaves the process's setting alone (torch's default: full fp32
    matmuls; cuDNN convolutions use TF32 either way). No effect on bf16/fp16 runs' low-precision
    matmuls or on CPUs."""
    raw: dict[str, Any] = field(default_factory=dict)
    """Escape hatch: merged last into the generated DeepSpeed config."""

    def __post_init__(self) -> None:
        if self.preset is not None:
            check(self.preset in PRESETS, "preset", f"got {self.preset!r}; allowed: {', '.join(PRESETS)}")
        check(self.zero_stage in (0, 1, 2, 3), "zero_stage", f"expected 0, 1, 2 or 3, got {self.zero_stage}")
        check(self.grad_accum >= 1, "grad_accum", f"expected >= 1, got {self.grad_accum}")
        check(self.backend in BACKENDS, "backend", f"got {self.backend!r}; allowed: {', '.join(BACKENDS)}")
        check(self.fairscale_mode in FAIRSCALE_MODES, "fairscale_mode",
              f"got {self.fairscale_mode!r}; allowed: {', '.join(FAIRSCALE_MODES)}")
        check(not self.offload_activations or self.activation_checkpointing, "offload_activations",
              "needs engine.activation_checkpointing: true (only checkpointed activations can be offloaded)")
        if self.backend == "fairscale":
            self._check_fairscale()
        else:
            check(self.fairscale_mode == "oss", "fairscale_mode",
                  f"is {self.fairscale_mode!r}, but engine.backend is deepspeed; set engine.backend: fairscale")
            check(not self.offload_activations, "offload_activations",
                  "is a fairscale setting (checkpoint_wrapper), but engine.backend is deepspeed; set engine.backend: fairscale")
        check(not self.offload_params or self.resolved()["zero_stage"] == 3, "offload_params",
              "parameter offload needs ZeRO stage 3")

    def _check_fairscale(self) -> None:
        """DeepSpeed-only settings are refused rather than ignored: a run must not silently shard
        (or offload) less than its recipe says."""
        modes = "engine.fairscale_mode: oss (sharded optimizer state and gradients, like ZeRO-2) or fsdp (parameters too, like ZeRO-3)"
        check(self.preset is None, "preset", f"is a DeepSpeed setting (got {self.preset!r}), but engine.backend is fairscale; use {modes}")
        check(self.zero_stage == 0, "zero_stage",
              f"is a DeepSpeed setting (got {self.zero_stage}), but engine.backend is fairscale; use {modes}")
        for name in ("offload_optimizer", "offload_params"):
            check(not getattr(self, name), name, "is a DeepSpeed setting, but engine.backend is fairscale; remove it")
        check(not self.raw, "raw", "is DeepSpeed's config, but engine.backend is fairscale; remove it")
        check(self.precision != "fp16", "precision",
              "fp16 is not supported with engine.backend fairscale; use bf16 (autocast, fp32 master weights) or fp32")

    def resolved(self) -> dict[str, Any]:
        """zero_stage / offload_optimizer / offload_params after applying the preset."""
        values = {"zero_stage": self.zero_stage, "offload_optimizer": self.offload_optimizer,
                  "offload_params": self.offload_params}
        if self.backend == "fairscale":  # the ZeRO stage with the same memory (for `beitdist plan`)
            return {**values, "zero_stage": 2 if self.fairscale_mode == "oss" else 3}
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
        # overlap_comm: ZeRO-3 reduce-scatters each gradient bucket on a side stream while the
        # backward goes on (DeepSpeed's own default for stage 3, and the same memory: one bucket
        # either way). ZeRO-1/2 keep it off, as DeepSpeed does: there it doubles the bucket.
        zero.update({"contiguous_gradients": True, "overlap_comm": resolved["zero_stage"] == 3,
                     "reduce_bucket_size": 5e7})
    if resolved["offload_optimizer"]:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": uses_cuda()}
    if resolved["offload_params"]:
        zero["offload_param"] = {"device": "cpu", "pin_memory": uses_cuda()}
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


def uses_cuda() -> bool:
    """Whether this rank trains on a GPU: torch sees one and DeepSpeed is not told to use the CPU
    (`DS_ACCELERATOR=cpu`). Everything that picks a device or a collective backend asks this, so
    the model (placed by DeepSpeed's accelerator), the batches and the process group agree."""
    return torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR", "").lower() != "cpu"


def apply_matmul_precision(engine: EngineConfig) -> None:
    """Turn on TF32 for this process's CUDA fp32 matmuls when the recipe asks. Only the CUDA
    switch: `torch.set_float32_matmul_precision` would also change oneDNN's CPU matmuls. torch
    >= 2.9 has a per-backend `fp32_precision` and refuses to mix it with the legacy `allow_tf32`
    flag once either is used, so the new switch is set where it exists."""
    if not engine.tf32:
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = "tf32"
    else:  # torch < 2.9
        matmul.allow_tf32 = True
    log.info("engine.tf32: fp32 matmuls on the GPU run in TensorFloat-32")


def device_for(dist_info: DistInfo) -> torch.device:
    if uses_cuda():
        return torch.device("cuda", dist_info.local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def init_distributed(dist_info: DistInfo, backend: str = "deepspeed") -> None:
    """Join (or create) the process group: nccl on GPUs, gloo on CPU. Both engines need one even
    for a single process, so a lone process gets a private group of one. Only the deepspeed
    backend imports DeepSpeed (its communication layer wraps the same torch process group)."""
    if uses_cuda():
        # before any collective: NCCL works on the current device, and a group made by the
        # caller (Ray Train, torchrun) does not say which of the visible GPUs is this rank's
        torch.cuda.set_device(device_for(dist_info))
    if backend == "deepspeed":
        deepspeed = import_deepspeed()

        if dist.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend())
            _release_shm_buffer()
            return
    elif dist.is_initialized():
        return
    comm = "nccl" if uses_cuda() else "gloo"
    port = dist_info.master_port or free_port()
    os.environ.update(
        RANK=str(dist_info.rank), WORLD_SIZE=str(dist_info.world_size), LOCAL_RANK=str(dist_info.local_rank),
        LOCAL_SIZE=os.environ.get("LOCAL_SIZE", str(dist_info.world_size)),
        MASTER_ADDR=dist_info.master_addr, MASTER_PORT=str(port),
    )
    if backend == "deepspeed":
        deepspeed.init_distributed(dist_backend=comm, auto_mpi_discovery=False, verbose=False)
        _release_shm_buffer()
    else:
        # DeepSpeed's 30 minutes (NCCL's own default is 10): rank 0 alone may spend minutes between
        # collectives (consolidating weights, uploading them to MLflow) while the others wait
        dist.init_process_group(comm, init_method="env://", rank=dist_info.rank, world_size=dist_info.world_size,
                                timeout=datetime.timedelta(minutes=30))


def _release_shm_buffer() -> None:
    """On CPU, DeepSpeed's shared-memory allreduce leaves its /dev/shm buffer behind after every
    run (`beitdist.deepspeed_shm`); once every rank has mapped every buffer, unlink ours."""
    if uses_cuda() or not dist.is_initialized():
        return
    from beitdist.deepspeed_shm import release_buffer

    dist.barrier()
    release_buffer(dist.get_rank())


@contextlib.contextmanager
def model_construction(engine: EngineConfig, ds_config: dict[str, Any]) -> Iterator[None]:
    """Build the model inside this: under ZeRO-3 parameters are partitioned as they are created."""
    if engine.backend == "deepspeed" and engine.stage == 3 and engine.zero_init:
        deepspeed = import_deepspeed()

        # offloaded parameters' host partitions are pinned by ds_config (offload_param.pin_memory)
        with deepspeed.zero.Init(config_dict_or_path=ds_config,
                                 remote_device="cpu" if engine.resolved()["offload_params"] else None):
            yield
    else:
        yield


def load_weights_into(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy a full state dict into a model whose parameters may be ZeRO-3 partitioned, one
    parameter at a time (never the whole model gathered on one rank)."""
    deepspeed = import_deepspeed()

    for name, tensor in model.named_parameters():
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=0):
            if dist.get_rank() == 0:
                tensor.data.copy_(state[name].to(tensor.dtype))
    # only rank 0 holds `state`. DeepSpeed broadcasts rank 0's module at initialize, except one
    # built under zero.Init (its buffers already on the device): then rank 0's buffers (e.g.
    # SyncBatchNorm's running statistics) are sent here
    partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
    for name, buffer in model.named_buffers():
        if name in state:
            buffer.data.copy_(state[name].to(buffer.dtype))
        if partitioned:
            dist.broadcast(buffer.data, src=0)
