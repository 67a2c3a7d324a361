"""Release the shared-memory buffer of DeepSpeed's CPU allreduce once every rank has mapped it.

DeepSpeed's CPU communication op (`deepspeed_shm_comm_op`, used when all ranks share one machine)
creates `/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>` (about
69 MB) per rank and never unlinks it: its `shared_close` is never called. Every run on a CPU
machine therefore leaves RAM behind in /dev/shm for good (a test suite, gigabytes). The name is
only needed while the other ranks open it, which `shm_initialize` does before it returns; after a
barrier that follows it, each rank unlinks its own name and the mappings stay valid until exit.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path

log = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
PREFIX = "deepspeed_allreduce_buffer"


def buffer_path(rank: int, environ: Mapping[str, str] | None = None, shm_dir: Path = SHM_DIR) -> Path:
    """Where DeepSpeed's shm_initialize puts this rank's buffer (its naming, shm.cpp)."""
    environ = os.environ if environ is None else environ
    addr, port = environ.get("MASTER_ADDR", ""), environ.get("MASTER_PORT", "")
    return shm_dir / f"{PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_buffer(rank: int, environ: Mapping[str, str] | None = None, shm_dir: Path = SHM_DIR) -> bool:
    """Unlink this rank's buffer name (call after a barrier that follows DeepSpeed's distributed
    initialisation); True when there was one. Never raises: a leftover is a leak, not an error."""
    path = buffer_path(rank, environ, shm_dir)
    try:
        path.unlink()
    except FileNotFoundError:
        return False
    except OSError as err:
        log.debug("could not unlink %s: %s", path, err)
        return False
    log.debug("unlinked %s (DeepSpeed never does)", path)
    return True
