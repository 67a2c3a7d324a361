"""The interface every training engine implements (DeepSpeed, fairscale), as Trainer uses it.

Trainer owns the loop, the data, the schedule (`apply_schedule` on `engine.optimizer`), NaN skips,
evaluation and the checkpoint directory (manifest, `latest`, pruning, consolidation); an engine
owns how the model is built, wrapped, stepped and how its part of a checkpoint is written.

Life of an engine on one rank:

    engine = create_engine(recipe.engine, recipe.optim, micro_batch, world_size, device)
    tag = engine.resume_tag(ckpt_dir, tag, saved_world_size)   # before build (DeepSpeed converts)
    with engine.model_construction():                          # ZeRO-3: parameters born partitioned
        model = build_model(...)
    engine.load_weights(model, state)                          # model.init (rank 0's state)
    engine.build(model, param_groups(model, optim))            # wrap + optimizer (one group builder)
    engine.load(ckpt_dir, tag)                                 # resume
    loop: out = engine.forward(pixels, mask); engine.backward(loss); norm = engine.step()
    engine.save(ckpt_dir, tag, client_state)                   # every rank; collective

`step()` is called once per micro-batch; the optimizer steps at the gradient-accumulation boundary
(every `grad_accum` calls), where it returns the global gradient norm before clipping.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from beitdist.engines.config import EngineConfig
from beitdist.engines.shards import ParamShard, replicated_shards
from beitdist.optim import OptimConfig


class TrainEngine(ABC):
    """One rank's engine. After `build`: `module` is the bare model (its state_dict keys are the
    beitdist names), `optimizer` has the layer-decay param groups that `apply_schedule` sets."""

    name: ClassVar[str]
    module: nn.Module
    optimizer: torch.optim.Optimizer

    def __init__(self, config: EngineConfig, optim: OptimConfig, micro_batch: int, world_size: int,
                 device: torch.device) -> None:
        self.config = config
        self.optim = optim
        self.micro_batch = micro_batch
        self.world_size = world_size
        self.device = device
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.precision, torch.float32)

    # ------------------------------------------------------------------ set-up
    def resume_tag(self, ckpt_dir: Path, tag: str, saved_world_size: int, converter: bool | None = None) -> str:
        """The tag to load for checkpoint `tag` saved by `saved_world_size` ranks (every rank calls
        it, before `build`). Default: the checkpoint itself, at any world size. `converter`: whether
        this rank writes a conversion the engine needs (default rank 0; the first rank of each node
        when the nodes share no file system)."""
        return tag

    @contextlib.contextmanager
    def model_construction(self) -> Iterator[None]:
        """Build the model inside this (ZeRO-3 partitions parameters as they are created)."""
        yield

    def load_weights(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        """Copy rank 0's full state dict (empty on other ranks) into the model before `build`; the
        engine makes every rank hold the same weights."""
        import torch.distributed as dist

        if dist.get_rank() != 0:
            return
        with torch.no_grad():
            for name, tensor in model.named_parameters():
                tensor.copy_(state[name].to(tensor.dtype))
            for name, buffer in model.named_buffers():
                if name in state:
                    buffer.copy_(state[name].to(buffer.dtype))

    @abstractmethod
    def build(self, model: nn.Module, groups: list[dict[str, Any]]) -> None:
        """Wrap `model` and create the optimizer from `groups` (beitdist.optim.param_groups)."""

    # -------------------------------------------------------------------- loop
    @abstractmethod
    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None) -> Any:
        """The wrapped model's output (ModelOutput) in the engine's precision."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of one micro-batch's loss (averaged over micro-batches and ranks)."""

    @abstractmethod
    def step(self) -> float | None:
        """End of a micro-batch: at the accumulation boundary clip, step the optimizer, zero the
        gradients and return the global gradient norm before clipping; None otherwise."""

    @abstractmethod
    def train(self) -> None: ...

    def parameter_shards(self) -> list[ParamShard]:
        """This rank's piece of every trainable parameter, as live views (after `build`): what
        state kept beside the optimizer's (model EMA) is sharded by. Default: engines whose every
        rank holds the whole model."""
        import torch.distributed as dist

        return replicated_shards(self.module, dist.get_rank(), dist.get_world_size())

    def release_gathered(self) -> None:
        """Drop gathered full copies of partitioned parameters, so that the next forward gathers
        what the pieces hold now (called after the pieces were written). Nothing to do where every
        rank holds the whole model."""

    @abstractmethod
    def eval(self) -> None: ...

    # ------------------------------------------------------------- checkpoints
    @abstractmethod
    def save(self, ckpt_dir: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Write this rank's part of checkpoint `ckpt_dir/tag` (collective: every rank calls it).
        The commit (manifest, `latest`) is the caller's, after every rank returned."""

    @abstractmethod
    def load(self, ckpt_dir: Path, tag: str) -> None:
        """Restore model and optimizer state from `ckpt_dir/tag` (after `build`)."""
