"""The few collectives the loop and the evaluation need, always on the rank's device (an NCCL
group has no CPU collectives) and answered on the CPU."""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduced(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The sum over ranks of a CPU tensor, reduced on `device`."""
    on_device = tensor.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


def all_gathered(value: float, device: torch.device, world: int) -> list[float]:
    """One number from every rank, in rank order."""
    mine = torch.tensor([value], dtype=torch.float64, device=device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine)
    return [float(t.item()) for t in every]


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on at least one rank (all-reduce MAX of one number)."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
