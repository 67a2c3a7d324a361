"""Which piece of each trainable parameter this rank owns, as a live view into the engine's storage.

Why: per-parameter state kept beside the optimizer's (model EMA, `beitdist.run.ema`) must be
sharded like the rest, or a ZeRO-3 run of BEiT-L would hold a full extra copy of the model on
every rank. Every engine here splits a parameter the same way ZeRO-3 partitions it: the flattened
tensor is cut into `world_size` equal pieces of ceil(numel / world_size) elements (the last ones
shorter or empty), rank r owning piece r. Under ZeRO-3 the piece is DeepSpeed's own partition
(`param.ds_tensor`); where every rank holds the whole parameter (ZeRO 0-2, fairscale OSS) it is a
view of the same elements. Shards saved by W ranks can therefore be put back together, and cut
again for any other world size, without the engine.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ParamShard:
    """This rank's piece of one parameter: elements [start, start + local.numel()) of the
    flattened parameter `name` of shape `shape`."""

    name: str
    local: torch.Tensor
    """A 1-D view into the live parameter storage (writing it changes the parameter)."""
    start: int
    shape: tuple[int, ...]
    replicated: bool
    """True when every rank holds the whole parameter (its `param.data`), which must then be put
    together again from every rank's piece after the piece is written; False under ZeRO-3, where
    the piece is all the rank holds and the engine gathers it for each forward."""
    param: nn.Parameter

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def piece(numel: int, rank: int, world_size: int) -> tuple[int, int]:
    """[start, end) of rank `rank`'s piece of a flattened tensor of `numel` elements (ZeRO-3's
    partitioning: equal pieces of ceil(numel / world_size), the tail ones shorter or empty)."""
    size = -(-numel // world_size)
    start = min(rank * size, numel)
    return start, min(start + size, numel)


def replicated_shards(module: nn.Module, rank: int, world_size: int) -> list[ParamShard]:
    """The pieces of a module whose every rank holds every parameter whole."""
    shards = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        start, end = piece(param.numel(), rank, world_size)
        shards.append(ParamShard(name, param.data.view(-1)[start:end], start, tuple(param.shape), True, param))
    return shards


def zero3_shards(module: nn.Module, rank: int, world_size: int) -> list[ParamShard]:
    """The pieces of a ZeRO-3 module: each parameter's own partition (`ds_tensor`, without its
    padding). DeepSpeed's hierarchical or MiCS partitionings cut differently; they are refused."""
    shards = []
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        zero_param: Any = param  # DeepSpeed's attributes (ds_numel, ds_tensor, ds_shape)
        numel = int(zero_param.ds_numel)
        start, end = piece(numel, rank, world_size)
        partition = zero_param.ds_tensor
        if int(partition.ds_numel) != -(-numel // world_size):
            raise NotImplementedError(
                f"{name}: this rank holds {int(partition.ds_numel)} of {numel} elements, not ZeRO-3's even "
                f"partition over {world_size} ranks (hierarchical or MiCS partitioning); not supported here")
        shards.append(ParamShard(name, partition.view(-1)[:end - start], start, tuple(zero_param.ds_shape), False, param))
    return shards
