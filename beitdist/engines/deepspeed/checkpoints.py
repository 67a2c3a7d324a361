"""DeepSpeed's checkpoint files: consolidation to full fp32 weights, and universal conversion.

Consolidation (`consolidate`) reads a checkpoint that may come from anywhere (`beitdist.load_model`
on a run directory someone sent), so it unpickles weights only: DeepSpeed's own reader
(`zero_to_fp32`) calls `torch.load(..., weights_only=False)` on every shard, which would run any
code a crafted file carries. The reader is run with its `torch.load` made a weights-only load
that allows exactly the DeepSpeed classes its files pickle (`safe_globals`); a file that needs
anything else is refused with a CheckpointError naming it, unless the caller passes
`trust_pickle=True`.

A resume at another world size goes through DeepSpeed's universal checkpoint (`to_universal`,
converted once by rank 0 in a subprocess: `ds_to_universal` spawns worker pools).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from beitdist.engines.deepspeed.importing import import_deepspeed
from beitdist.engines.deepspeed.output import printed_to_log

MODEL_STATES = "*model_states.pt"
OPTIM_STATES = "*optim_states.pt"
ZERO0_MODEL_STATES = "mp_rank_00_model_states.pt"
_reader_lock = threading.Lock()


def safe_globals() -> list[Any]:
    """The classes DeepSpeed (0.19) pickles into its checkpoint files beside tensors and builtins
    (found with `torch.serialization.get_unsafe_globals_in_checkpoint` on checkpoints of ZeRO
    0-3, fp32 / bf16, with and without offload): the loss scaler of ZeRO 1-3 (DynamicLossScaler
    under fp16), the ZeRO stage enum, and ZeRO-1/2's parameter fragment addresses. Plain data
    classes whose unpickling runs no code of the file's choosing."""
    import_deepspeed()
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _load(path: Path, trust_pickle: bool, mmap: bool = False) -> Any:
    from beitdist.run.checkpoints import load_checkpoint_file

    return load_checkpoint_file(path, trust_pickle, safe_globals(), mmap=mmap)


class _WeightsOnlyTorch(types.ModuleType):
    """`torch` as DeepSpeed's zero_to_fp32 module sees it during a consolidation: every attribute
    is torch's, except `load`, which is a weights-only load (`_load`) that also records the names
    of the files it read."""

    def __init__(self, load: Callable[..., Any]) -> None:
        super().__init__("torch")
        self._safe_load = load
        self.read: set[str] = set()

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    def load(self, f: Any, *args: Any, mmap: bool | None = None, **kwargs: Any) -> Any:
        self.read.add(Path(f).name)
        return self._safe_load(Path(f), mmap=bool(mmap))


def _zero_state_dict(tag_dir: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """DeepSpeed's ZeRO 1-3 consolidation of the optimizer's fp32 partitions, with every file it
    reads loaded as `_load` loads it (zero_to_fp32 calls `torch.load` through its module global).
    A DeepSpeed upgrade that stops reading its shards that way is noticed: the consolidation then
    stops with an error instead of going on without the check (tests/test_consolidation_pickle.py
    also plants a gadget in each kind of shard)."""
    import_deepspeed()
    from deepspeed.utils import zero_to_fp32

    if trust_pickle:
        with printed_to_log("zero_to_fp32"):
            return zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
    reader = _WeightsOnlyTorch(lambda path, mmap: _load(path, trust_pickle=False, mmap=mmap))
    with _reader_lock:  # the module attribute is process-wide: one consolidation at a time
        real, zero_to_fp32.torch = zero_to_fp32.torch, reader
        try:
            with printed_to_log("zero_to_fp32"):
                state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=tag_dir.name)
        finally:
            zero_to_fp32.torch = real
    unread = {p.name for pattern in (MODEL_STATES, OPTIM_STATES) for p in tag_dir.glob(pattern)} - reader.read
    if unread:
        raise RuntimeError(f"DeepSpeed's zero_to_fp32 read {', '.join(sorted(unread))} in {tag_dir} without "
                           "torch.load; beitdist cannot check those files: consolidate with trust_pickle=True if "
                           "you trust them")
    return state


def _fp32(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def consolidate(tag_dir: Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a DeepSpeed checkpoint directory of any ZeRO stage:
    the optimizer's fp32 partitions merged (ZeRO 1-3), plus the buffers (BatchNorm statistics),
    which only the model-states file keeps; ZeRO-0 keeps everything in its model-states file.
    Files are unpickled weights-only (`safe_globals` allowed) unless `trust_pickle`."""
    tag_dir = Path(tag_dir)
    if any(tag_dir.glob(OPTIM_STATES)):
        state = _zero_state_dict(tag_dir, trust_pickle)
        module = _load(next(tag_dir.glob(MODEL_STATES)), trust_pickle)["module"]
        for key, value in (module or {}).items():
            state.setdefault(key, value.float() if value.is_floating_point() else value)
        return _fp32(state)
    return _fp32(_load(tag_dir / ZERO0_MODEL_STATES, trust_pickle)["module"])


def to_universal(ckpt_dir: Path, tag: str) -> str:
    """Convert a checkpoint to DeepSpeed's universal format (for a different world size); returns
    the universal tag, written into `latest_universal`. Runs once, on rank 0."""
    from beitdist.run.files import write_atomic

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
