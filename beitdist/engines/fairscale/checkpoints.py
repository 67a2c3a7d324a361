"""The files of a fairscale checkpoint (`<ckpt_dir>/step_N/`), and their consolidation.

Rank 0 writes the full model state (identical on every rank under OSS; gathered under fsdp) to
MODEL_FILE, so consolidating is reading that one file: no fairscale import, no other rank's file.
The optimizer state goes to OPTIM_FILE (`oss`, consolidated on rank 0) or to one shard per rank
(`fsdp`, `optim_shard_file`); those are read back only by a resume (`FairscaleEngine.load`).
"""

from __future__ import annotations

from pathlib import Path

import torch

MODEL_FILE = "fairscale_model_states.pt"
"""The full model state of a fairscale checkpoint (written by rank 0)."""
OPTIM_FILE = "fairscale_optim_states.pt"
"""The optimizer state of a fairscale `oss` checkpoint, consolidated on rank 0."""


def optim_shard_file(rank: int) -> str:
    """This rank's optimizer shard of an `fsdp` checkpoint."""
    return f"fairscale_optim_states_rank{rank}.pt"


def wrote(tag_dir: Path) -> bool:
    """Whether the fairscale engine wrote this checkpoint directory."""
    return (Path(tag_dir) / MODEL_FILE).exists()


def consolidate(tag_dir: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model: the model file already holds them. The file is read
    with `weights_only` (it holds tensors, numbers and strings only) unless `trust_pickle`; a file
    that would unpickle anything else is refused with a CheckpointError naming it."""
    from beitdist.run.checkpoints import load_checkpoint_file

    module = load_checkpoint_file(Path(tag_dir) / MODEL_FILE, trust_pickle)["module"]
    return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
