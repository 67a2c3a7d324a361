"""A distributed sampler that can be resumed mid-epoch, also at another world size.

The epoch's GLOBAL order is a permutation of the dataset drawn from (seed, epoch) alone, the same on
every rank. Rank r of W takes positions p + r, p + r + W, ... of that order, where p is the number
of GLOBAL samples already consumed this epoch: after k steps of per-rank batches of b, the ranks
together have consumed exactly the prefix order[:k*b*W], whatever W is. The state is therefore just
{"epoch", "position"}; resuming with another world size W' hands out order[p:] round-robin over W'
ranks, i.e. exactly the samples the interrupted run had not yet seen, in the same global order.

The sampler cannot see what the training loop consumed (a DataLoader prefetches ahead), so whoever
yields batches to the loop calls `advance(n)` with the per-rank sample count of each batch
delivered; `beitdist.data.pipeline.BeitLoader` does this. `set_epoch(e)` with a NEW epoch resets the
position to 0; calling it again with the epoch of a loaded state keeps the loaded position, so the
usual `for epoch in range(start, end): loader.set_epoch(epoch)` resumes where it stopped.

Per epoch, the remaining samples are made divisible by W: dropped at the tail (`drop_last=True`) or
padded by repeating the start of the order (`drop_last=False`, as torch's DistributedSampler), so
every rank gets the same number of samples and collective ops stay in lockstep.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np
from torch.utils.data import Sampler

from beitdist.errors import InputError

logger = logging.getLogger(__name__)


class ResumableDistributedSampler(Sampler[int]):
    """Indices for one rank; see the module docstring for the resume rule."""

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False) -> None:
        if dataset_len < 1:
            raise InputError(f"cannot sample from an empty dataset (dataset_len={dataset_len})")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if drop_last and dataset_len < world_size:
            raise InputError(f"drop_last with {dataset_len} samples and {world_size} ranks leaves ranks nothing")
        self.dataset_len, self.rank, self.world_size = dataset_len, rank, world_size
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self.epoch = 0
        self.position = 0
        """Global samples consumed in `epoch` (a prefix of `order(epoch)`)."""

    def order(self, epoch: int | None = None) -> np.ndarray:
        """The epoch's global order (identical on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        if not self.shuffle:
            return np.arange(self.dataset_len)
        return np.random.default_rng([int(self.seed), int(epoch)]).permutation(self.dataset_len)

    def _remaining(self) -> np.ndarray:
        rest = self.order()[self.position :]
        if len(rest) == 0:
            return rest
        if self.drop_last:
            return rest[: len(rest) // self.world_size * self.world_size]
        pad = -len(rest) % self.world_size
        if pad:
            rest = np.concatenate([rest, np.resize(self.order(), pad)])
        return rest

    def __iter__(self) -> Iterator[int]:
        return iter(int(i) for i in self._remaining()[self.rank :: self.world_size])

    def __len__(self) -> int:
        return len(self._remaining()) // self.world_size

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def advance(self, num_samples: int) -> None:
        """Record that this rank's training loop received `num_samples` more samples (every rank the
        same number); the global position moves by num_samples * world_size."""
        self.position = min(self.dataset_len, self.position + int(num_samples) * self.world_size)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        missing = {"epoch", "position"} - set(state)
        if missing:
            raise InputError(f"sampler state is missing {sorted(missing)}; got keys {sorted(state)}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if not 0 <= position <= self.dataset_len:
            raise InputError(f"sampler position {position} is outside [0, {self.dataset_len}] for this dataset; "
                             "was the state saved for another dataset?")
        self.epoch, self.position = epoch, position
        logger.info("sampler resumes epoch %d at global sample %d of %d (rank %d of %d)",
                    epoch, position, self.dataset_len, self.rank, self.world_size)
