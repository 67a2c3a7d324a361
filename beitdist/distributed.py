"""The distributed set-up every engine shares: who this rank is, which device it trains on, and
the torch process group.

Engine-agnostic on purpose: the Trainer, the launcher and the data pipeline ask these questions
without importing any engine. `beitdist.engines.init_distributed` joins the group for the recipe's
engine: torch's `init_process_group` here, or DeepSpeed's communication layer (which wraps the same
torch process group) in `beitdist.engines.deepspeed.comm`, which reuses `select_device` and
`rendezvous_env` so that both engines name ranks, ports and devices alike.
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import logging
import os
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from beitdist.errors import RunFailedError
from beitdist.network import DEFAULT_ROUTE_PROBE, bind_collectives, loopback_problem, rendezvous_hint, route_source

if TYPE_CHECKING:
    from beitdist.engines.config import EngineConfig

log = logging.getLogger(__name__)

PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=30)
"""DeepSpeed's 30 minutes (NCCL's own default is 10): rank 0 alone may spend minutes between
collectives (consolidating weights, uploading them to MLflow) while the others wait."""


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


def select_device(dist_info: DistInfo) -> None:
    """Before any collective: NCCL works on the current device, and a group made by the caller
    (Ray Train, torchrun) does not say which of the visible GPUs is this rank's."""
    if uses_cuda():
        torch.cuda.set_device(device_for(dist_info))


def rendezvous_env(dist_info: DistInfo) -> str:
    """Put this rank's place in the environment (`env://` rendezvous; a lone process gets a free
    port) and return the collective backend: nccl on GPUs, gloo on CPU."""
    port = dist_info.master_port or free_port()
    local_size = os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or str(dist_info.world_size)
    if dist_info.world_size > 1:  # the interface this node reaches MASTER_ADDR through (beitdist.network)
        source = route_source(dist_info.master_addr)
        if int(local_size) < dist_info.world_size and (source is None or ipaddress.ip_address(source).is_loopback):
            # MASTER_ADDR is this host's own name, resolving to 127.0.1.1 here (and to the real
            # address on the other nodes): the interface of the default route instead
            source = route_source(DEFAULT_ROUTE_PROBE)
        bind_collectives(source, cuda=uses_cuda())
        problem = None if uses_cuda() else loopback_problem(dist_info.world_size, int(local_size))
        if problem is not None:
            raise RendezvousError(problem)
    os.environ.update(
        RANK=str(dist_info.rank), WORLD_SIZE=str(dist_info.world_size), LOCAL_RANK=str(dist_info.local_rank),
        # ranks on this node: DeepSpeed's CPU shared-memory all-reduce is used only when it equals
        # the world size (every rank on one machine); a multi-node torchrun says it per node
        LOCAL_SIZE=local_size,
        MASTER_ADDR=dist_info.master_addr, MASTER_PORT=str(port),
    )
    return "nccl" if uses_cuda() else "gloo"


def init_process_group(dist_info: DistInfo) -> None:
    """Join (or create) the torch process group. Every engine needs one even for a single process,
    so a lone process gets a private group of one; a group the caller made is kept."""
    select_device(dist_info)
    if dist.is_initialized():
        return
    comm = rendezvous_env(dist_info)
    with rendezvous_errors():
        dist.init_process_group(comm, init_method="env://", rank=dist_info.rank, world_size=dist_info.world_size,
                                timeout=PROCESS_GROUP_TIMEOUT)


class RendezvousError(RunFailedError):
    """The ranks could not connect to each other (a peer advertised an address the others cannot
    reach, or a firewall); every rank fails alike, so no final barrier."""

    all_ranks = False


@contextlib.contextmanager
def rendezvous_errors() -> Iterator[None]:
    """A failed connect inside `init_process_group` becomes RendezvousError with the hint."""
    try:
        yield
    except (RuntimeError, OSError) as err:  # torch's DistBackendError is a RuntimeError
        hint = rendezvous_hint(str(err))
        if hint is None:
            raise
        raise RendezvousError(hint) from err

