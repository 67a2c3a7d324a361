"""Model EMA (`train.ema`): an exponential moving average of the weights, sharded like them.

Why sharded: unilm and timm keep a whole second model (`ModelEma`) on every GPU, which under ZeRO-3
would undo what sharding saves. Here each rank averages only its piece of every trainable parameter
(`TrainEngine.parameter_shards`: ZeRO-3's own partition, or the same elements of a whole
parameter), in fp32, so the average costs 4 bytes per parameter spread over the ranks.

Checkpoints: every rank writes its pieces to `<step_N>/beitdist_ema/rank_RRRRR.safetensors`
before the checkpoint's commit, so the manifest covers them and a half-written average is never
resumed. A file says where each piece starts; resume reads the overlapping parts of any number of
files, so a run resumes its average at another world size too, and `ema_state_dict` puts the
whole averaged model together for `final/`.

Evaluation swaps the averaged weights into the model (`swapped_in`) and back: where every rank
holds whole parameters the pieces are all-gathered into them; under ZeRO-3 the partitions are
written and DeepSpeed's gathered copies dropped, so the next forward gathers the average.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from beitdist.backbone.convert import CheckpointError
from beitdist.engines.shards import ParamShard

log = logging.getLogger("beitdist.train")

EMA_DIR = "beitdist_ema"


def shard_file(tag_dir: Path, rank: int) -> Path:
    return Path(tag_dir) / EMA_DIR / f"rank_{rank:05d}.safetensors"


def has_ema(tag_dir: Path) -> bool:
    return any((Path(tag_dir) / EMA_DIR).glob("rank_*.safetensors"))


class ModelEma:
    """The average of this rank's pieces; every method that touches the model is collective."""

    def __init__(self, engine: Any, decay: float) -> None:
        self.engine, self.decay = engine, decay
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.updates = 0
        self.averages: dict[str, torch.Tensor] = {}
        self.restart()

    def _shards(self) -> list[ParamShard]:
        # asked afresh each time: an engine may move its storage (a resume, an offload swap)
        return self.engine.parameter_shards()

    @torch.no_grad()
    def restart(self) -> None:
        """Start the average from the weights the model holds now."""
        self.averages = {s.name: s.local.detach().to(torch.float32, copy=True) for s in self._shards()}
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ema = decay * ema + (1 - decay) * weights."""
        shards = self._shards()
        averages = [self.averages[s.name] for s in shards]
        current = [s.local.to(torch.float32) for s in shards]
        torch._foreach_lerp_(averages, current, 1.0 - self.decay)
        self.updates += 1

    # ------------------------------------------------------------ evaluation
    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        """The averaged weights in the model inside the block, the trained ones back after it
        (bit for bit: the pieces are kept in the model's own dtype)."""
        shards = self._shards()
        trained = [s.local.clone() for s in shards]
        self.engine.release_gathered()
        self._write(shards, [self.averages[s.name] for s in shards])
        try:
            yield
        finally:
            self.engine.release_gathered()
            self._write(shards, trained)

    @torch.no_grad()
    def _write(self, shards: list[ParamShard], values: list[torch.Tensor]) -> None:
        for shard, value in zip(shards, values, strict=True):
            shard.local.copy_(value)
            if shard.replicated and self.world > 1:
                size = -(-shard.numel // self.world)
                mine = torch.zeros(size, dtype=shard.local.dtype, device=shard.local.device)
                mine[:shard.local.numel()] = shard.local
                everyone = torch.empty(size * self.world, dtype=mine.dtype, device=mine.device)
                dist.all_gather_into_tensor(everyone, mine)
                shard.param.data.view(-1).copy_(everyone[:shard.numel])

    # ----------------------------------------------------------- checkpoints
    def save(self, tag_dir: Path) -> None:
        """This rank's pieces, before the checkpoint's commit (every rank)."""
        shards = self._shards()
        path = shard_file(tag_dir, self.rank)
        path.parent.mkdir(parents=True, exist_ok=True)
        pieces = {s.name: [s.start, list(s.shape)] for s in shards}
        meta = {"world_size": str(self.world), "rank": str(self.rank), "decay": repr(self.decay),
                "updates": str(self.updates), "pieces": json.dumps(pieces)}
        save_file({s.name: self.averages[s.name].detach().cpu().contiguous() for s in shards}, str(path), metadata=meta)

    @torch.no_grad()
    def load(self, tag_dir: Path) -> bool:
        """This rank's pieces from a checkpoint saved by any number of ranks. False when the
        checkpoint has no average (it was saved without train.ema): the average then starts from
        the resumed weights."""
        files = _ema_files(tag_dir)
        if not files:
            return False
        shards = self._shards()
        for shard in shards:
            target = self.averages[shard.name]
            _fill(target, shard.name, shard.start, shard.numel, files, tag_dir)
        meta = files[0].metadata
        self.updates = int(meta.get("updates", 0))
        saved_decay = float(meta.get("decay", self.decay))
        if saved_decay != self.decay:
            log.warning("the checkpoint's EMA was averaged with decay %s; continuing with train.ema.decay %s",
                        saved_decay, self.decay)
        return True


class _EmaFile:
    """One rank's EMA file, opened lazily: its pieces are read only where they are needed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = safe_open(str(path), framework="pt")
        self.metadata = self.handle.metadata() or {}
        try:
            self.pieces: dict[str, list[Any]] = json.loads(self.metadata["pieces"])
        except (KeyError, ValueError) as err:
            raise CheckpointError(f"{path}: not a beitdist EMA file (no piece table: {err})") from None


def _ema_files(tag_dir: Path) -> list[_EmaFile]:
    paths = sorted((Path(tag_dir) / EMA_DIR).glob("rank_*.safetensors"))
    try:
        return [_EmaFile(path) for path in paths]
    except (OSError, ValueError, RuntimeError) as err:  # safetensors' own errors are plain exceptions
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{Path(tag_dir) / EMA_DIR}: an EMA file is unreadable ({type(err).__name__}: {err})") from None


def _fill(target: torch.Tensor, name: str, start: int, numel: int, files: list[_EmaFile], tag_dir: Path) -> None:
    """Elements [start, start + target.numel()) of parameter `name` from the files' pieces."""
    end = start + target.numel()
    covered = 0
    for ema_file in files:
        if name not in ema_file.pieces:
            continue
        piece_start, shape = ema_file.pieces[name]
        saved_numel = 1
        for dim in shape:
            saved_numel *= int(dim)
        if saved_numel != numel:
            raise CheckpointError(f"{ema_file.path}: the EMA of {name} has {saved_numel} elements, the model's has "
                                  f"{numel}; the checkpoint is of another model")
        values = ema_file.handle.get_slice(name)
        length = values.get_shape()[0]
        lo, hi = max(start, piece_start), min(end, piece_start + length)
        if lo >= hi:
            continue
        target[lo - start:hi - start] = values[lo - piece_start:hi - piece_start].to(target.dtype)
        covered += hi - lo
    if covered != end - start:
        raise CheckpointError(f"{Path(tag_dir) / EMA_DIR}: the EMA of {name} is incomplete (elements {start}-{end} "
                              f"of {numel}: {covered} found); a rank's file is missing")


def ema_state_dict(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The whole averaged model (fp32, trainable parameters only) from a checkpoint's EMA files."""
    files = _ema_files(tag_dir)
    if not files:
        raise CheckpointError(f"{tag_dir}: holds no model EMA ({EMA_DIR}/); it was saved without train.ema")
    state = {}
    for name, (_, shape) in files[0].pieces.items():
        full = torch.empty(tuple(int(d) for d in shape), dtype=torch.float32)
        _fill(full.view(-1), name, 0, full.numel(), files, tag_dir)
        state[name] = full
    return state

