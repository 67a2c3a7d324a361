"""A run's checkpoint directory: `<run_dir>/checkpoints/step_N/` (`RunDir.checkpoints`).

Each engine writes its own files into step_N (DeepSpeed's sharded format, or fairscale's model
file plus consolidated optimizer state); this module adds what neither engine has: a manifest written after every rank finished
(files and sizes, so a truncated or half-written checkpoint is detected and skipped), an atomic
`latest` pointer (a crash mid-save never leaves one that cannot be loaded), resume from the newest
complete checkpoint with one warning for the broken ones it passed over, pruning that never leaves
fewer complete checkpoints than before, and a failed save (disk full) turned into one clear line.

What is inside step_N is the engine's business: `consolidated_state_dict` asks the package of
the engine that wrote it (`beitdist.engines.<backend>.checkpoints.consolidate`), imported only
then, and `load_checkpoint_file` is the one weights-only reader both engines' consolidations use.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import json
import logging
import os
import pickle
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from beitdist.run.files import fsync_dir, fsync_file, write_atomic

log = logging.getLogger(__name__)

MANIFEST = "beitdist_manifest.json"
LATEST = "latest"
ENGINE_CHECKPOINTS = {"deepspeed": "beitdist.engines.deepspeed.checkpoints",
                      "fairscale": "beitdist.engines.fairscale.checkpoints"}
"""Where each engine reads its own checkpoint files (`consolidate(tag_dir, trust_pickle)`)."""
TAG_PATTERN = re.compile(r"step_(\d+)")
LOW_SPACE_BYTES = 1 << 20
"""A write failing without errno (torch's zip writer) with less free space than this, or than the
previous checkpoint takes, is reported as a full disk."""
def _step(tag: str) -> int:
    match = TAG_PATTERN.fullmatch(tag)
    return int(match.group(1)) if match else -1


def read_latest(ckpt_dir: Path) -> str | None:
    """The tag `latest` names (None when there is no readable `latest`)."""
    try:
        return (Path(ckpt_dir) / LATEST).read_text(encoding="utf-8").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


def commit_checkpoint(ckpt_dir: Path, tag: str, world_size: int) -> None:
    """The commit point of a checkpoint, on one process: flush every file to disk, record files
    and sizes in the manifest, then point `latest` at the tag. A checkpoint without a manifest
    never counts as complete, so a save that dies anywhere before this leaves nothing usable
    behind and nothing that looks usable."""
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag
    files: dict[str, int] = {}
    for path in sorted(tag_dir.rglob("*")):
        if path.is_file() and path.name != MANIFEST and not path.name.startswith("."):
            fsync_file(path)
            files[str(path.relative_to(tag_dir))] = path.stat().st_size
    fsync_dir(tag_dir)
    manifest = {"tag": tag, "files": files, "world_size": world_size}
    write_atomic(tag_dir / MANIFEST, json.dumps(manifest, indent=1))
    write_atomic(ckpt_dir / LATEST, tag)


def finish_checkpoint(ckpt_dir: Path, tag: str) -> Path:
    """After every rank wrote its shard: rank 0 commits the checkpoint (manifest, then `latest`).
    Until then the checkpoint does not count as complete. A rank that failed to write never
    reaches the first barrier, so no manifest is ever written for a partial checkpoint."""
    ckpt_dir = Path(ckpt_dir)
    dist.barrier()
    if dist.get_rank() == 0:
        commit_checkpoint(ckpt_dir, tag, dist.get_world_size())
    dist.barrier()
    return ckpt_dir / tag


def checkpoint_problems(tag_dir: Path) -> list[str]:
    """Why a checkpoint directory cannot be trusted (empty when it is complete): each entry names
    the file and what is wrong with it (missing, or its size against the manifest's)."""
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return [f"{tag_dir} does not exist"]
    manifest = tag_dir / MANIFEST
    if not manifest.exists():
        return [f"{tag_dir} has no {MANIFEST} (its save did not finish, or the manifest was deleted)"]
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        expected = {str(name): int(size) for name, size in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        return [f"{manifest} is unreadable ({type(err).__name__}: {err})"]
    problems = []
    for name, size in expected.items():
        path = tag_dir / name
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"{path} is missing (the manifest lists it with {size} bytes)")
            continue
        if actual != size:
            why = "truncated" if actual < size else "changed after the save"
            problems.append(f"{path} is {actual} bytes, expected {size} ({why})")
    return problems


@dataclass(frozen=True)
class CheckpointScan:
    """Every checkpoint of a run directory, judged once: what resume, pruning and loading need."""

    complete: list[str]
    """Tags of complete checkpoints, newest (highest step) first."""
    broken: dict[str, list[str]]
    """Tags that cannot be used (including one `latest` names that does not exist), with why."""
    latest: str | None


def scan_checkpoints(ckpt_dir: Path) -> CheckpointScan:
    """Judge every `step_N` directory by its manifest; a `latest` naming a checkpoint that is gone
    counts as a broken checkpoint too, since otherwise deleting the newest checkpoint would make
    resume fall back silently."""
    ckpt_dir = Path(ckpt_dir)
    latest = read_latest(ckpt_dir)
    complete, broken = [], {}
    tag_dirs = [p for p in ckpt_dir.iterdir() if p.is_dir() and TAG_PATTERN.fullmatch(p.name)] if ckpt_dir.is_dir() else []
    for tag_dir in tag_dirs:
        problems = checkpoint_problems(tag_dir)
        if problems:
            broken[tag_dir.name] = problems
        else:
            complete.append(tag_dir.name)
    if latest is not None and TAG_PATTERN.fullmatch(latest) and not (ckpt_dir / latest).exists():
        broken[latest] = [f"{ckpt_dir / latest} does not exist, though {ckpt_dir / LATEST} names it (deleted?)"]
    complete.sort(key=_step, reverse=True)
    return CheckpointScan(complete, dict(sorted(broken.items(), key=lambda kv: _step(kv[0]), reverse=True)), latest)


def complete_tags(ckpt_dir: Path, *, quiet: bool = False) -> list[str]:
    """Tags of complete checkpoints, newest (highest step) first; broken ones are skipped and,
    unless `quiet`, logged (once per call, one line per checkpoint)."""
    scan = scan_checkpoints(ckpt_dir)
    if not quiet:
        for tag, problems in scan.broken.items():
            log.warning("skipping checkpoint %s: %s", tag, "; ".join(problems[:3]))
    return scan.complete


@dataclass(frozen=True)
class ResumePoint:
    tag: str | None
    """The newest complete checkpoint (None: start from scratch)."""
    skipped: dict[str, list[str]]
    """Newer checkpoints that cannot be used, with why (older broken ones do not matter here)."""
    ckpt_dir: Path

    def warning(self) -> str | None:
        """One line for the log when a newer checkpoint had to be passed over (None otherwise)."""
        if not self.skipped:
            return None
        names = ", ".join(self.skipped)
        why = "; ".join(problem for problems in self.skipped.values() for problem in problems[:3])
        noun = "checkpoint" if len(self.skipped) == 1 else "checkpoints"
        if self.tag is None:
            then = f"no complete checkpoint is left in {self.ckpt_dir}, so training starts from step 0"
        else:
            then = f"resuming from the previous complete checkpoint {self.tag} ({self.ckpt_dir / self.tag})"
        return f"newest {noun} {names} cannot be used: {why}; {then}"


def resume_point(ckpt_dir: Path) -> ResumePoint:
    """Where a run resumes: the newest complete checkpoint, and the newer ones it had to skip."""
    scan = scan_checkpoints(ckpt_dir)
    tag = scan.complete[0] if scan.complete else None
    newest = _step(tag) if tag is not None else -1
    skipped = {t: problems for t, problems in scan.broken.items() if _step(t) > newest}
    return ResumePoint(tag, skipped, Path(ckpt_dir))


def is_committed(ckpt_dir: Path, tag: str) -> bool:
    """Whether `tag` finished its commit: complete, and the one `latest` names."""
    return read_latest(ckpt_dir) == tag and not checkpoint_problems(Path(ckpt_dir) / tag)


def _repoint_latest(ckpt_dir: Path, scan: CheckpointScan | None = None) -> str | None:
    """Point `latest` at the newest complete checkpoint (remove it when there is none), so that
    `latest` never names a checkpoint that is gone or half-written."""
    scan = scan or scan_checkpoints(ckpt_dir)
    target = scan.complete[0] if scan.complete else None
    if target is None:
        (Path(ckpt_dir) / LATEST).unlink(missing_ok=True)
    elif scan.latest != target:
        write_atomic(Path(ckpt_dir) / LATEST, target)
    return target


def discard_checkpoint(ckpt_dir: Path, tag: str) -> None:
    """Remove checkpoint `tag` (half-written, or a stale leftover about to be rewritten). The
    manifest goes first, so a removal that is cut short never leaves something that looks
    complete; `latest` moves back to the newest complete checkpoint if it named this one."""
    ckpt_dir = Path(ckpt_dir)
    tag_dir = ckpt_dir / tag
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        (tag_dir / MANIFEST).unlink()
    shutil.rmtree(tag_dir, ignore_errors=True)
    if read_latest(ckpt_dir) == tag:
        _repoint_latest(ckpt_dir)


def _free_bytes(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def checkpoint_bytes(tag_dir: Path) -> int:
    """Size of a complete checkpoint, from its manifest (0 when unknown)."""
    try:
        return sum(int(size) for size in json.loads((Path(tag_dir) / MANIFEST).read_text(encoding="utf-8"))["files"].values())
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return 0


def write_error_cause(err: BaseException, where: Path, needed: int = 0) -> tuple[str, bool]:
    """(what went wrong, whether it is a lack of space) for an exception raised while writing a
    checkpoint of about `needed` bytes under `where`. torch's zip writer (DeepSpeed's default)
    reports a full disk as a bare "RuntimeError: [enforce fail at inline_container.cc] unexpected
    pos ..." with no errno, and a rank whose directory another rank removed after its own failure
    sees ENOENT; both are judged by the free space: less than a checkpoint needs (or under 1 MiB)
    means the disk is full. The answer is the same on every rank, so every rank says the same."""
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        return err.strerror or os.strerror(err.errno), True
    if not isinstance(err, OSError) or err.errno in (None, errno.ENOENT):
        free = _free_bytes(Path(where))
        if free is not None and free < max(needed, LOW_SPACE_BYTES):
            return os.strerror(errno.ENOSPC), True
    if isinstance(err, OSError) and err.errno is not None:
        return err.strerror or os.strerror(err.errno), False
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__), False


def abandon_checkpoint(ckpt_dir: Path, tag: str, err: BaseException, remove: bool = True) -> str:
    """After a failed save: return the one line that tells the user what failed, where, what is
    still intact and what to do; with `remove` (rank 0 only: another rank may still be writing),
    also delete the half-written `tag` and make sure `latest` names the newest complete
    checkpoint. Without it the directory stays incomplete (no manifest) until the next save of
    that step replaces it."""
    ckpt_dir = Path(ckpt_dir)
    scan = scan_checkpoints(ckpt_dir)
    previous = next((t for t in scan.complete if t != tag), None)
    needed = checkpoint_bytes(ckpt_dir / previous) if previous is not None else 0
    cause, no_space = write_error_cause(err, ckpt_dir, needed)
    log.debug("saving checkpoint %s failed", tag, exc_info=err)
    if remove:
        discard_checkpoint(ckpt_dir, tag)
        try:
            _repoint_latest(ckpt_dir)
        except OSError as repoint_err:
            log.warning("could not rewrite %s: %s", ckpt_dir / LATEST, repoint_err)
    kept = (f"the previous checkpoint {previous} is intact" if previous is not None
            else "there is no earlier complete checkpoint, so the next launch starts from step 0")
    todo = "free space" if no_space else "fix the cause"
    resume = "launch again to resume" if previous is not None else "launch again"
    return f"could not save checkpoint {tag} to {ckpt_dir / tag}: {cause}; {kept}; {todo} and {resume}"


def prune_checkpoints(ckpt_dir: Path, keep: int, newest: str) -> list[str]:
    """Delete complete checkpoints beyond the newest `keep`, only once `newest` (the one just
    saved) is complete, and never the one `latest` names: pruning must never leave a run with
    fewer complete checkpoints than it had before the save. Broken directories are left alone
    (they are replaced when their step is saved again). Returns the deleted tags."""
    ckpt_dir = Path(ckpt_dir)
    problems = checkpoint_problems(ckpt_dir / newest)
    if problems:
        log.warning("not pruning old checkpoints: the new checkpoint %s is not complete (%s)", newest, problems[0])
        return []
    scan = scan_checkpoints(ckpt_dir)
    deleted = []
    for tag in scan.complete[max(keep, 1):]:
        if tag in (newest, scan.latest):
            continue
        discard_checkpoint(ckpt_dir, tag)
        shutil.rmtree(ckpt_dir / f"{tag}_universal", ignore_errors=True)
        deleted.append(tag)
    return deleted


def saved_world_size(tag_dir: Path) -> int:
    return int(json.loads((Path(tag_dir) / MANIFEST).read_text())["world_size"])


def checkpoint_backend(tag_dir: Path) -> str:
    """The engine that wrote a checkpoint directory: "fairscale" or "deepspeed"."""
    from beitdist.engines.fairscale.checkpoints import wrote

    return "fairscale" if wrote(tag_dir) else "deepspeed"


def corrupt_checkpoint(path: Path, err: BaseException) -> Exception:
    """The CheckpointError for a file that is not a readable checkpoint (random bytes, truncated)."""
    from beitdist.backbone.convert import CheckpointError

    text = str(err)
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # torch's own words, without its advice
    reason = unpickler.group(1) if unpickler else (text.strip().splitlines() or [""])[0]
    return CheckpointError(f"{path}: corrupt or not a checkpoint ({type(err).__name__}: {reason.strip()[:200]})")


def load_checkpoint_file(path: Path, trust_pickle: bool = False, safe_globals: Iterable[Any] = (),
                         mmap: bool = False) -> Any:
    """`torch.load` of one checkpoint file onto the CPU, weights only: tensors, containers,
    numbers, strings, and the classes in `safe_globals`. A file that would unpickle anything else
    (run code of its choosing) is refused with a CheckpointError naming it, unless
    `trust_pickle`, which loads everything. A file that is no checkpoint at all is a
    CheckpointError "corrupt or not a checkpoint" either way: trusting it would not help."""
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(list(safe_globals)):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as err:
        # only a well-formed pickle naming a global the safe loader refuses is worth trusting
        refused = re.search(r"GLOBAL (\S+)", str(err))
        if trust_pickle or refused is None:
            raise corrupt_checkpoint(path, err) from None
        from beitdist.backbone.convert import CheckpointError

        what = f"arbitrary objects (here {refused.group(1)})"
        raise CheckpointError(
            f"{path}: refused to unpickle {what}. If you trust this file, load it with trust_pickle=True "
            "(CLI: --trust-pickle)"
        ) from None
    except OSError:
        raise  # a missing or unreadable file: the caller says which
    except Exception as err:  # noqa: BLE001 - garbage bytes fail anywhere in the unpickler (IndexError, ...)
        raise corrupt_checkpoint(path, err) from None


def consolidated_state_dict(ckpt_dir: Path, tag: str, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """fp32 weights of the whole model from a checkpoint of either engine (any ZeRO stage, or a
    fairscale checkpoint), consolidated by the package of the engine that wrote it. Its files are
    unpickled weights-only unless `trust_pickle` (`load_checkpoint_file`)."""
    tag_dir = Path(ckpt_dir) / tag
    engine_checkpoints = importlib.import_module(ENGINE_CHECKPOINTS[checkpoint_backend(tag_dir)])
    return engine_checkpoints.consolidate(tag_dir, trust_pickle=trust_pickle)


def run_recipe(run_dir: Path) -> dict[str, Any] | None:
    """The recipe a run trained with (as its newest complete checkpoint saved it, after `--set`
    and `inherit:`), or None when the run has no readable checkpoint."""
    from beitdist.run.rundir import RunDir

    layout = RunDir(run_dir)
    for tag in complete_tags(layout.checkpoints, quiet=True):
        try:
            recipe = json.loads(layout.state_file(tag).read_text()).get("recipe")
        except (OSError, ValueError):
            continue
        if isinstance(recipe, dict):
            from beitdist.credentials import without_redacted

            return without_redacted(recipe)
    return None


def run_world_size(run_dir: Path) -> int | None:
    """How many ranks the run trained on (its validation split was sharded that way)."""
    from beitdist.run.rundir import RunDir

    layout = RunDir(run_dir)
    try:
        size = json.loads(layout.result_file.read_text()).get("world_size")
        if isinstance(size, int) and size > 0:
            return size
    except (OSError, ValueError):
        pass
    tags = complete_tags(layout.checkpoints, quiet=True)
    return saved_world_size(layout.tag(tags[0])) if tags else None
