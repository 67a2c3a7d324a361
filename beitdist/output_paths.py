"""Where a command may write its output (an export, a conversion, a checkpoint directory, a
codebook file), and how a directory is swapped in.

A user's typo must never cost them data: `beitdist export runs/X runs/X` once deleted the run it
was exporting. So an output directory is written into a new hidden sibling and renamed into place
only when the target

- does not exist, or is an empty directory (nothing to lose), or
- already holds a checkpoint of the same kind, nothing else, and the caller asked to replace it
  (`overwrite=True`, CLI `--overwrite`).

Everything else is refused before any work is done, in one line that says what is there: a
regular file, a run directory, a directory with other files, a checkpoint of another kind, the
source being read (or a directory inside it or holding it). The new directory's permissions
follow the umask, as any file the user creates (a temp dir would be 0700 and break the shared run
directories that several nodes read).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from beitdist.errors import InputError
from beitdist.run.rundir import RunDir

CHECKPOINT_FILES: dict[str, frozenset[str]] = {
    "beitdist": frozenset({"beitdist_config.json", "model.safetensors"}),
    "hf": frozenset({"config.json", "model.safetensors", "pytorch_model.bin"}),
    "onnx": frozenset({"model.onnx", "preprocessing.json"}),
}
"""The files a checkpoint of each kind consists of (`KIND_MARKERS` names the kind)."""

KIND_MARKERS = {"beitdist": "beitdist_config.json", "hf": "config.json", "onnx": "model.onnx"}
KIND_NAMES = {"beitdist": "beitdist checkpoint", "hf": "transformers directory", "onnx": "ONNX export"}


class OutputError(InputError):
    """An output path that would destroy something if written."""


def _kind_of(directory: Path) -> str | None:
    # a beitdist checkpoint is tested first: its directory may not hold a config.json, but an HF
    # directory never holds beitdist_config.json
    for kind in ("beitdist", "hf", "onnx"):
        if (directory / KIND_MARKERS[kind]).is_file():
            return kind
    return None


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _enclosing_run(path: Path) -> Path | None:
    """The training run directory `path` lies inside, if any: a parent holding run markers besides
    a `final/` (a folder of the user's may well be called "final")."""
    return next((parent for parent in path.parents if set(RunDir.markers(parent)) - {RunDir.FINAL}), None)


def _refusal(out: Path, kind: str, overwrite: bool, sources: Iterable[Path], run_owned: bool = False) -> str | None:
    """Why writing a `kind` directory at `out` would lose data, or None when it is safe.
    `run_owned`: the run itself replacing its own `final/`."""
    resolved = out.resolve()
    for source in sources:
        src = Path(source).resolve()
        if _within(resolved, src):
            return f"{out}: is the source {source} or inside it; write the output somewhere else"
        if _within(src, resolved):
            return f"{out}: holds the source {source}; replacing it would delete the source"
    if out.is_symlink():
        return f"{out}: is a symbolic link; give the real path or a new directory"
    if not out.exists():
        return _parent_problem(out)
    owner = _enclosing_run(resolved)
    if owner is not None and not run_owned:
        return (f"{out}: belongs to the training run {owner}; it is never replaced from outside the run, "
                "write the output to a new directory")
    if not out.is_dir():
        return f"{out}: is a file, not a directory; give a new directory for the {KIND_NAMES[kind]}"
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return None
    run_markers = RunDir.markers(out)
    if run_markers:
        return (f"{out}: is a training run directory (holds {', '.join(run_markers)}); it is never replaced, "
                "write the output to a new directory")
    found = _kind_of(out)
    if found is None:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        return (f"{out}: exists and is not a checkpoint (holds {shown}); give a new or empty directory")
    if found != kind:
        return (f"{out}: holds a {KIND_NAMES[found]}, not a {KIND_NAMES[kind]}; give a new directory")
    extra = [name for name in entries if name not in CHECKPOINT_FILES[kind]]
    if extra:
        return (f"{out}: holds a {KIND_NAMES[kind]} and other files ({', '.join(extra[:5])}) that replacing it "
                "would delete; give a new directory")
    if not overwrite:
        return f"{out}: a {KIND_NAMES[kind]} is already there; pass --overwrite (Python: overwrite=True) to replace it"
    return None


def _parent_problem(out: Path) -> str | None:
    """A new path can be created unless its nearest existing ancestor is a file, or not writable."""
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                return f"{out}: its parent {parent} is a file, not a directory"
            if not os.access(parent, os.W_OK | os.X_OK):
                return f"{out}: cannot write in {parent} (permission denied); choose another place"
            return None
    return None


def check_output_dir(out: str | os.PathLike, kind: str, *, overwrite: bool = False,
                     sources: Iterable[str | os.PathLike] = (), run_owned: bool = False) -> Path:
    """Raise OutputError when writing a `kind` checkpoint directory at `out` would lose data;
    returns `out` made absolute.

    Call it before the expensive part (loading, consolidating) so a refused output costs nothing;
    `write_output_dir` checks again right before swapping the directory in. `run_owned` is for a
    training run replacing its own `final/` (inside the run directory)."""
    if kind not in CHECKPOINT_FILES:
        raise ValueError(f"unknown output kind {kind!r}")
    out = Path(os.path.abspath(out))  # "." has no name to put a sibling beside
    problem = _refusal(out, kind, overwrite, [Path(s) for s in sources], run_owned)
    if problem is not None:
        raise OutputError(problem)
    return out


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only a fallback)
    os.umask(mask)
    return mask


def write_safetensors_file(path: Path, tensors: dict, metadata: dict[str, str]) -> Path:
    """`tensors` as a safetensors file at `path` (already checked by `check_output_file`), written
    atomically: a temp file beside it, then os.replace, so a crash never leaves a half-written file
    where a run would read it; the temp file is removed on any failure."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        save_file(tensors, str(tmp), metadata=metadata)
        follow_umask(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def follow_umask(path: Path) -> None:
    """Give `path` (and, for a directory, what it holds) the permissions a plain `open()` /
    `mkdir()` would: safetensors and temp helpers create 0600 files, unreadable by the other
    users of a shared run directory."""
    mask = current_umask()
    paths = [path, *path.rglob("*")] if path.is_dir() else [path]
    for item in paths:
        item.chmod((0o777 if item.is_dir() else 0o666) & ~mask)


def _new_sibling(out: Path, label: str) -> Path:
    """A fresh hidden directory beside `out`, created with the umask's permissions."""
    path = out.with_name(f".{out.name}.{label}-{uuid.uuid4().hex[:8]}")
    path.mkdir()
    return path


def write_output_dir(out: str | os.PathLike, kind: str, write: Callable[[Path], None], *, overwrite: bool = False,
                     sources: Iterable[str | os.PathLike] = (), run_owned: bool = False) -> Path:
    """Write a checkpoint directory with `write(tmp_dir)` and swap it in at `out` atomically.

    A crash or a failed write leaves `out` as it was; the old checkpoint (only with `overwrite`)
    is removed only after the new one is in place, and put back if the swap fails."""
    sources = list(sources)
    out = check_output_dir(out, kind, overwrite=overwrite, sources=sources, run_owned=run_owned)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_sibling(out, "new")
    old: Path | None = None
    try:
        write(tmp)
        follow_umask(tmp)
        check_output_dir(out, kind, overwrite=overwrite, sources=sources, run_owned=run_owned)  # nothing new there
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            out.rename(old)
        tmp.rename(out)
    except BaseException:
        if old is not None and not out.exists():
            old.rename(out)  # the swap failed half-way: the user's checkpoint goes back where it was
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def check_output_file(out: str | os.PathLike, what: str, is_same_kind: Callable[[Path], bool], *,
                      overwrite: bool = False) -> Path:
    """Raise OutputError unless `out` is a new file path, or a file of the same kind (`is_same_kind`)
    that the caller asked to replace. `what` names the kind in the message ("codebook")."""
    out = Path(out)
    if out.is_symlink():
        raise OutputError(f"{out}: is a symbolic link; give the real path or a new file")
    if not out.exists():
        problem = _parent_problem(out)
        if problem is not None:
            raise OutputError(problem)
        return out
    if out.is_dir():
        raise OutputError(f"{out}: is a directory; give a file path for the {what}")
    if not is_same_kind(out):
        raise OutputError(f"{out}: exists and is not a {what}; give a new file path")
    if not overwrite:
        raise OutputError(f"{out}: a {what} is already there; pass --overwrite (Python: overwrite=True) to replace it")
    return out
