"""Files written whole or not at all: `write_atomic`, and the fsyncs that make a write durable."""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path

_NO_DIR_FSYNC = (errno.EINVAL, errno.EBADF, errno.EISDIR, errno.EPERM, errno.EACCES, errno.ENOTSUP)


def fsync_dir(directory: Path) -> None:
    """Make a rename or a new file in `directory` durable; file systems that cannot fsync a
    directory (some network ones) are skipped, real I/O errors are not."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as err:
        if err.errno not in _NO_DIR_FSYNC:
            raise
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Force a file another process wrote (DeepSpeed's shards) to disk before the manifest vouches
    for it: after a power loss a manifest must never describe data that only lived in the page
    cache. A full disk can also first show up here (delayed allocation, network file systems)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, text: str | bytes, durable: bool = True) -> None:
    """Replace `path` with `text` (or bytes) so that readers (and a crash) see the old content or the new,
    never a mix; when the write fails (disk full) the temporary file is removed and the old
    content stays as it was. `durable=False` skips the fsyncs, for files rewritten every second
    whose loss on power failure costs nothing (progress)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(text.encode("utf-8") if isinstance(text, str) else text)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
