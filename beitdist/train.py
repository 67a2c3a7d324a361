"""The per-worker training loop: the same code under Ray, torchrun, or a single plain process.

recipe -> plugins resolved by name in this process -> data loaders -> model (under zero.Init for
ZeRO-3) -> training engine (DeepSpeed or fairscale, `beitdist.engines`, chosen by engine.backend)
-> resume from the newest complete checkpoint -> steps, evaluations, checkpoints -> final fp32
weights consolidated into a beitdist checkpoint.

The public entry point; the code lives in `beitdist.run`: the loop in `run/trainer.py`, evaluation
in `run/evaluator.py`, checkpoint saving and consolidation in `run/checkpoint_writer.py`, the run
directory's layout in `run/rundir.py`.

Randomness is a function of (seed, step, rank) for the model (drop path) and of (seed, epoch,
sample index) for the data, so a run resumed at step k replays what an uninterrupted run would have
done: bit for bit on CPUs; on GPUs up to the last bits, because some CUDA kernels (the index
backward of the relative-position gather, memory-efficient attention's backward) and NCCL's
reductions do not fix their order of summation.
"""

from __future__ import annotations

from beitdist.run.checkpoint_writer import CheckpointSaveError
from beitdist.run.trainer import NonFiniteLossError, PreemptedError, Reporter, TrainResult, run

__all__ = ["CheckpointSaveError", "NonFiniteLossError", "PreemptedError", "Reporter", "TrainResult", "run"]
