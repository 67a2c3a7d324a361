"""fairscale behind the TrainEngine interface (`engine.backend: fairscale`).

Modes (`engine.fairscale_mode`):
- `oss`: the optimizer state is sharded over the ranks (fairscale's OSS around torch AdamW built
  from beitdist's layer-decay groups) and ShardedDataParallel reduces each gradient to the rank
  that owns it (ZeRO-1/2 style). Works on CPU (gloo) and GPU. Clipping uses OSS.clip_grad_norm,
  which computes the global norm across the shards.
- `fsdp`: FullyShardedDataParallel (parameters sharded too, ZeRO-3 style), each block wrapped on
  its own. GPU only: fairscale's FSDP asserts CUDA (hard-coded CUDA streams).

Activation checkpointing wraps every block in fairscale's `checkpoint_wrapper` (with
`engine.offload_activations` the saved activations go to CPU). bf16 runs under torch.autocast
with fp32 weights and optimizer state.

Checkpoints (`<ckpt_dir>/step_N/`, committed by the caller like DeepSpeed's): rank 0 writes the
full model state (identical on every rank under OSS) to `fairscale_model_states.pt`; the optimizer
state is consolidated to rank 0 (OSS.consolidate_state_dict) into `fairscale_optim_states.pt`, so
an `oss` checkpoint resumes at any world size. Under `fsdp` each rank writes its own optimizer
shard (`fairscale_optim_states_rank{R}.pt`), which resumes at the same world size only.
Consolidation (`beitdist.engines.fairscale.checkpoints.consolidate`) reads the model file alone.
"""

from __future__ import annotations

import contextlib
import logging
import math
from pathlib import Path
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from beitdist.backbone.convert import CheckpointError
from beitdist.engines.base import TrainEngine
from beitdist.engines.shards import ParamShard
from beitdist.engines.fairscale.checkpoints import MODEL_FILE, OPTIM_FILE, optim_shard_file
from beitdist.optim import OptimConfig, adamw_options, build_adamw, optimizer_groups

log = logging.getLogger(__name__)


def sharded_adamw(groups: list[dict[str, Any]], config: OptimConfig) -> torch.optim.Optimizer:
    """beitdist's AdamW over the layer-decay groups, wrapped in fairscale's OSS: each rank keeps
    and steps its shard of the state."""
    from fairscale.optim import OSS

    # force_broadcast_object: consolidation for a checkpoint sends each rank's state as bytes
    # and loads it on the receiver's own device; broadcast_object_list would unpickle it onto
    # the sender's GPU index, opening a CUDA context and a copy of every shard on every GPU
    return OSS(optimizer_groups(groups), optim=torch.optim.AdamW, force_broadcast_object=True,
               **adamw_options(config))


class FairscaleEngine(TrainEngine):
    name = "fairscale"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.mode = self.config.fairscale_mode
        self.accum = self.config.grad_accum
        self._micro = 0

    # ------------------------------------------------------------------ set-up
    def build(self, model: nn.Module, groups: list[dict[str, Any]]) -> None:
        model.to(self.device)
        if self.config.activation_checkpointing:
            from fairscale.nn.checkpoint import checkpoint_wrapper

            for block in cast(Any, model.backbone).blocks:  # patches forward in place: parameter names stay the same
                checkpoint_wrapper(block, offload_to_cpu=self.config.offload_activations)
        self.module = model
        if self.config.compile:
            model.compile()  # in place: names and state dict keys stay those of the eager model
            log.info("model compiled (torch.compile, inductor); the first steps include compiling")
        if self.mode == "oss":
            from fairscale.nn.data_parallel import ShardedDataParallel

            self.optimizer: Any = sharded_adamw(groups, self.optim)  # fairscale's OSS
            # broadcast_buffers off: BEiT's buffers are constants, and evaluation must not need
            # collectives per forward; rank 0's parameters and buffers are broadcast once here
            self.wrapped = ShardedDataParallel(model, self.optimizer, broadcast_buffers=False,
                                               sync_models_at_startup=True)
        else:
            from fairscale.nn.data_parallel import FullyShardedDataParallel as FSDP

            for module in model.modules():  # rank 0's weights (model.init) everywhere before sharding
                for tensor in list(module.parameters(recurse=False)) + list(module.buffers(recurse=False)):
                    dist.broadcast(tensor.data, src=0)
            blocks = cast(Any, model.backbone).blocks
            for i in range(len(blocks)):
                blocks[i] = FSDP(blocks[i], flatten_parameters=False)
            # flatten_parameters=False keeps the Parameter objects the layer-decay groups hold
            self.wrapped = FSDP(model, flatten_parameters=False)
            self.optimizer = build_adamw(groups, self.optim)

    # -------------------------------------------------------------------- loop
    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.config.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> Any:
        # evaluation bypasses the ShardedDataParallel wrapper: it needs no gradient reduction, and
        # the wrapper would re-plan its reduction (with a warning) at every change of mode
        runner = self.wrapped if self.module.training or self.mode == "fsdp" else self.module
        with self._autocast():
            return runner(pixel_values, bool_masked_pos)

    def _boundary(self) -> bool:
        return (self._micro + 1) % self.accum == 0

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients averaged over micro-batches (as DeepSpeed does: loss / grad_accum) and ranks
        (the wrapper divides by the world size); reduced only at the accumulation boundary."""
        if self.accum > 1:
            loss = loss / self.accum
        with contextlib.nullcontext() if self._boundary() else self.wrapped.no_sync():
            loss.backward()

    def step(self) -> float | None:
        boundary = self._boundary()
        self._micro += 1
        if not boundary:
            return None
        max_norm = self.optim.clip_grad if self.optim.clip_grad > 0 else math.inf
        if self.mode == "oss":
            norm = self.optimizer.clip_grad_norm(max_norm)
        else:
            norm = self.wrapped.clip_grad_norm_(max_norm)
        self.optimizer.step()
        self.wrapped.zero_grad(set_to_none=True)
        return float(norm)

    def train(self) -> None:
        (self.wrapped if self.mode == "fsdp" else self.module).train()

    def eval(self) -> None:
        (self.wrapped if self.mode == "fsdp" else self.module).eval()

    def parameter_shards(self) -> list[ParamShard]:
        if self.mode == "fsdp":  # the recipe refuses train.ema with fsdp before any compute
            raise NotImplementedError("fairscale fsdp shards parameters its own way; per-parameter pieces are "
                                      "available with engine.fairscale_mode: oss or the deepspeed engine")
        return super().parameter_shards()

    # ------------------------------------------------------------- checkpoints
    def save(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        tag_dir = Path(ckpt_dir) / tag
        rank = dist.get_rank()
        if self.mode == "oss":
            self.optimizer.consolidate_state_dict(recipient_rank=0)  # collective
            model_state = self.module.state_dict() if rank == 0 else None
        else:
            model_state = self.wrapped.state_dict()  # collective: every rank gathers the full weights
        if rank == 0:
            tag_dir.mkdir(parents=True, exist_ok=True)
            torch.save({"module": model_state, "client_state": client_state, "world_size": self.world_size,
                        "mode": self.mode}, tag_dir / MODEL_FILE)
            if self.mode == "oss":
                torch.save(self.optimizer.state_dict(), tag_dir / OPTIM_FILE)
        if self.mode == "oss":
            self.optimizer._all_states = []  # the consolidated copy is not kept in memory
        else:
            dist.barrier()  # the directory exists before every rank writes its shard
            torch.save(self.optimizer.state_dict(), tag_dir / optim_shard_file(rank))

    def load(self, ckpt_dir: Path, tag: str) -> None:
        tag_dir = Path(ckpt_dir) / tag
        saved = torch.load(tag_dir / MODEL_FILE, map_location="cpu", weights_only=False)
        if saved.get("mode", "oss") != self.mode:
            raise CheckpointError(f"{tag_dir} was saved with engine.fairscale_mode {saved.get('mode')}, but this run uses "
                             f"{self.mode}; resume with the same mode")
        if self.mode == "oss":
            self.module.load_state_dict(saved["module"])
            # the whole consolidated state, on the host: OSS copies the shard this rank owns to its device
            optim_state = torch.load(tag_dir / OPTIM_FILE, map_location="cpu", weights_only=False)
            self.optimizer.load_state_dict(optim_state)
            return
        if saved["world_size"] != self.world_size:
            raise CheckpointError(f"{tag_dir} holds fsdp optimizer shards of {saved['world_size']} ranks, this run has "
                             f"{self.world_size}; resume fsdp checkpoints at the same world size")
        self.wrapped.load_state_dict(saved["module"])
        rank_file = tag_dir / optim_shard_file(dist.get_rank())
        self.optimizer.load_state_dict(torch.load(rank_file, map_location=self.device, weights_only=False))
