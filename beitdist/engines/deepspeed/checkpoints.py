"""DeepSpeed's checkpoint files: consolidation to full fp32 weights, and universal conversion.

Consolidation (`consolidate`) merges the optimizer's fp32 partitions with DeepSpeed's own reader
(`zero_to_fp32`). A resume at another world size goes through DeepSpeed's universal checkpoint
(`to_universal`, converted once by rank 0 in a subprocess: `ds_to_universal` spawns worker pools).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from beitdist.engines.deepspeed.importing import import_deepspeed

MODEL_STATES = "*model_states.pt"
OPTIM_STATES = "*optim_states.pt"
ZERO0_MODEL_STATES = "mp_rank_00_model_states.pt"


def _fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def consolidate(tag_dir: Path) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a DeepSpeed checkpoint directory of any ZeRO stage:
    the optimizer's fp32 partitions merged (ZeRO 1-3), plus the buffers (BatchNorm statistics),
    which only the model-states file keeps; ZeRO-0 keeps everything in its model-states file."""
    tag_dir = Path(tag_dir)
    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if any(tag_dir.glob(OPTIM_STATES)):
        state = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        module = torch.load(next(tag_dir.glob(MODEL_STATES)), map_location="cpu", weights_only=False)["module"]
        for key, value in (module or {}).items():
            state.setdefault(key, value.float() if value.is_floating_point() else value)
        return _fp32(state)
    return _fp32(torch.load(tag_dir / ZERO0_MODEL_STATES, map_location="cpu", weights_only=False)["module"])


def to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert a checkpoint to DeepSpeed's universal format (for a different world size); returns
    the universal tag, written into `latest_universal`. Runs once, on rank 0."""
    from beitdist.run_checkpoints import write_atomic

    ckpt_dir = Path(ckpt_dir)
    universal = f"{tag}_universal"
    if not (ckpt_dir / universal).exists():
        tmp = ckpt_dir / f".{universal}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
               "--input_folder", str(ckpt_dir / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
               "--num_merge_workers", "1"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"converting {ckpt_dir / tag} to a universal checkpoint failed:\n{result.stderr[-2000:]}")
        os.replace(tmp, ckpt_dir / universal)
    write_atomic(ckpt_dir / "latest_universal", universal)
    return universal
