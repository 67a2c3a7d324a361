"""DeepSpeed (ZeRO 0-3, offload) behind the TrainEngine interface.

The config comes from `beitdist.engines.deepspeed.config`; beitdist's own AdamW (layer-decay
groups) is the client optimizer (`beitdist.engines.deepspeed.optim`). Checkpoints are DeepSpeed's
sharded format; a resume at another world size goes through DeepSpeed's universal checkpoint
(converted once, by rank 0: `beitdist.engines.deepspeed.checkpoints.to_universal`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from beitdist.engines.base import TrainEngine
from beitdist.engines.deepspeed import checkpoints, zero
from beitdist.engines.deepspeed.config import deepspeed_config
from beitdist.engines.deepspeed.importing import import_deepspeed
from beitdist.engines.deepspeed.optim import build_optimizer
from beitdist.engines.shards import ParamShard, zero3_shards

log = logging.getLogger(__name__)


class DeepSpeedEngine(TrainEngine):
    name = "deepspeed"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ds_config = deepspeed_config(self.config, self.optim, self.micro_batch, self.world_size)

    # ------------------------------------------------------------------ set-up
    def resume_tag(self, ckpt_dir: Path, tag: str, saved_world_size: int, converter: bool | None = None) -> str:
        """DeepSpeed cannot re-partition ZeRO state for another world size directly: convert the
        checkpoint to the universal format (rank 0, once) and load that."""
        if saved_world_size == self.world_size or not any((Path(ckpt_dir) / tag).glob("*optim_states.pt")):
            return tag  # same world size, or ZeRO-0: the whole optimizer state is in one file, unsharded
        log.info("checkpoint %s was saved by %d ranks, resuming on %d: converting to a universal checkpoint",
                 tag, saved_world_size, self.world_size)
        if dist.get_rank() == 0 if converter is None else converter:
            checkpoints.to_universal(ckpt_dir, tag)
        dist.barrier()
        self.ds_config["checkpoint"] = {"load_universal": True}
        return f"{tag}_universal"

    @contextlib.contextmanager
    def model_construction(self) -> Iterator[None]:
        with zero.model_construction(self.config, self.ds_config):
            yield

    def load_weights(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        zero.load_weights_into(model, state)

    def build(self, model: nn.Module, groups: list[dict[str, Any]]) -> None:
        deepspeed = import_deepspeed()
        optimizer = build_optimizer(groups, self.optim, cpu_offload=self.config.resolved()["offload_optimizer"])
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.module = self.engine.module
        if self.config.compile:
            # DeepSpeed's own compile keeps its ZeRO hooks out of the graphs (they stay eager)
            self.engine.compile(backend="inductor")
            log.info("model compiled (torch.compile, inductor); the first steps include compiling")

    # -------------------------------------------------------------------- loop
    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> Any:
        return self.engine(pixel_values.to(self.dtype), bool_masked_pos)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> float | None:
        boundary = self.engine.is_gradient_accumulation_boundary()
        # DeepSpeed reports no norm for ZeRO-0 in fp32 only; computing one costs a sync per step
        own = self._grad_norm() if boundary and self.config.stage == 0 and self.config.precision == "fp32" else None
        self.engine.step()
        if not boundary:
            return None
        norm = self.engine.get_global_grad_norm()
        return own if norm is None else float(norm)

    def _grad_norm(self) -> float | None:
        """Global gradient norm before clipping, where DeepSpeed reports none (ZeRO 0 fp32)."""
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        if not grads:
            return None
        # one fused kernel per device and dtype (as clip_grad_norm_ does), not one norm per tensor
        norms = torch._foreach_norm(grads)
        return float(torch.linalg.vector_norm(torch.stack([n.float() for n in norms])))

    def train(self) -> None:
        self.engine.train()

    def parameter_shards(self) -> list[ParamShard]:
        if self.config.stage == 3:
            return zero3_shards(self.module, dist.get_rank(), dist.get_world_size())
        return super().parameter_shards()

    def release_gathered(self) -> None:
        """ZeRO-3 keeps some parameters gathered between forwards (the small "persistent" ones,
        and any a forward left behind): release them all, so none is used stale."""
        if self.config.stage == 3:
            self.engine.empty_partition_cache()

    def eval(self) -> None:
        self.engine.eval()

    # ------------------------------------------------------------- checkpoints
    def save(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        """DeepSpeed's shards, marked convertible to the universal format: `ds_to_universal`
        refuses ZeRO-1/2 checkpoints without `universal_checkpoint_info` (Megatron writes it; a
        plain model has no tensor-parallel patterns to declare, so the empty info is complete)."""
        from deepspeed.checkpoint.constants import (
            UNIVERSAL_CHECKPOINT_INFO,
            UNIVERSAL_CHECKPOINT_VERSION_KEY,
            UNIVERSAL_CHECKPOINT_VERSION_VALUE,
        )

        client_state = {UNIVERSAL_CHECKPOINT_INFO: {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE},
                        **client_state}
        self.engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)

    def load(self, ckpt_dir: Path, tag: str) -> None:
        """Load checkpoint `tag`, mending two things DeepSpeed's universal-checkpoint loader for
        ZeRO-3 (0.19) gets wrong after a world-size change: it copies the hyperparameters of
        param group 0 into every group (erasing layer-wise lr decay and the no-weight-decay
        groups), and it gives every parameter sub-group the SAME `step` tensor, which AdamW then
        increments once per sub-group per optimizer step (wrong bias correction from the first
        step on). Put back the groups' own settings (the recipe defines them) and one `step`
        per state."""
        groups = [{k: v for k, v in group.items() if k != "params"} for group in self.optimizer.param_groups]
        self.engine.load_checkpoint(str(ckpt_dir), tag=tag)
        if tag.endswith("_universal"):
            for group, own in zip(self.optimizer.param_groups, groups, strict=True):
                group.update(own)
            inner = getattr(self.optimizer, "optimizer", self.optimizer)
            for state in inner.state.values():
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].clone()
