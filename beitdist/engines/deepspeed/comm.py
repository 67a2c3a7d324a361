"""The process group through DeepSpeed's communication layer (`deepspeed.comm`).

DeepSpeed keeps its own handle on the torch process group; the engine, ZeRO and the universal
checkpoint loader all talk through it, so a DeepSpeed run joins (or adopts the caller's group)
with `deepspeed.init_distributed` rather than torch's alone. Ranks, ports and devices come from
`beitdist.distributed`, as for every engine.
"""

from __future__ import annotations

import torch.distributed as dist

from beitdist.distributed import DistInfo, rendezvous_env, rendezvous_errors, select_device, uses_cuda
from beitdist.engines.deepspeed.importing import import_deepspeed
from beitdist.engines.deepspeed.output import printed_to_log


def init_distributed(dist_info: DistInfo) -> None:
    """Join (or create) the process group through DeepSpeed: nccl on GPUs, gloo on CPU; a lone
    process gets a private group of one. A group the caller made (Ray Train, torchrun) is kept,
    with its backend."""
    select_device(dist_info)
    deepspeed = import_deepspeed()
    with printed_to_log("deepspeed.init_distributed"):  # "... shm_comm_op built successfully"
        if dist.is_initialized():
            deepspeed.init_distributed(dist_backend=dist.get_backend())
        else:
            comm = rendezvous_env(dist_info)
            with rendezvous_errors():
                deepspeed.init_distributed(dist_backend=comm, auto_mpi_discovery=False, verbose=False)
    _release_shm_buffer()


def _release_shm_buffer() -> None:
    """On CPU, DeepSpeed's shared-memory allreduce leaves its /dev/shm buffer behind after every
    run (`beitdist.engines.deepspeed.shm`); once every rank has mapped every buffer, unlink ours."""
    if uses_cuda() or not dist.is_initialized():
        return
    from beitdist.engines.deepspeed.shm import release_buffer

    dist.barrier()
    release_buffer(dist.get_rank())
