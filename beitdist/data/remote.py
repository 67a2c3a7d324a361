"""Dataset files in object storage or on the web (`s3://`, `gs://`, `http(s)://`, ...), through fsspec.

ImageNet-22k-scale shards live in object storage, not on the training nodes' disks. Every path a
dataset option takes may be a URL; local paths keep their plain `open`/`os.walk` code (no
behaviour change, no fsspec import). `storage_options` are fsspec's keyword arguments for the
filesystem (for S3-compatible stores: `endpoint_url`, `key`, `secret`; or the usual AWS_*
environment variables, which s3fs reads). The protocol's package (s3fs for `s3://`, gcsfs for
`gs://`) is an extra; without it the error names what to install.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import IO, Any

from beitdist.errors import InputError

PROTOCOL_PACKAGES = {"s3": "beitdist[s3] (s3fs)", "s3a": "beitdist[s3] (s3fs)", "gs": "gcsfs", "gcs": "gcsfs",
                     "az": "adlfs", "abfs": "adlfs"}


def is_remote(path: str) -> bool:
    """A URL with a protocol other than the local disk's."""
    match = re.match(r"([A-Za-z][A-Za-z0-9+.-]*)://", path)
    return match is not None and match.group(1).lower() not in ("file", "local")


def filesystem(url: str, storage_options: Mapping[str, Any] | None = None) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for `url`; one InputError when the protocol's package is
    missing or the options do not fit the filesystem."""
    import fsspec

    protocol = url.split("://", 1)[0].lower()
    try:
        fs, path = fsspec.core.url_to_fs(url, **dict(storage_options or {}))
    except ImportError as err:
        package = PROTOCOL_PACKAGES.get(protocol, f"the fsspec implementation of {protocol}://")
        raise InputError(f"{url}: reading {protocol}:// needs {package}: pip install it ({err})") from None
    except (TypeError, ValueError) as err:
        raise InputError(f"{url}: storage_options {dict(storage_options or {})} do not fit the {protocol}:// "
                         f"filesystem ({err})") from None
    return fs, path


def _url(fs: Any, path: str) -> str:
    return str(fs.unstrip_protocol(path))


def glob(pattern: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Sorted URLs of the files matching `pattern` (`*`, `?`, `[..]` as fsspec's glob)."""
    fs, path = filesystem(pattern, storage_options)
    try:
        found = fs.glob(path) if any(c in path for c in "*?[") else ([path] if fs.isfile(path) else [])
    except (OSError, PermissionError) as err:
        raise InputError(f"{pattern}: cannot be listed ({type(err).__name__}: {err})") from None
    return sorted(_url(fs, p) for p in found if fs.isfile(p))


def open_binary(url: str, storage_options: Mapping[str, Any] | None = None) -> IO[bytes]:
    """A readable binary stream of the file at `url` (streamed, not downloaded whole first)."""
    fs, path = filesystem(url, storage_options)
    return fs.open(path, "rb")


def read_bytes(url: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    fs, path = filesystem(url, storage_options)
    return bytes(fs.cat_file(path))


def subdirectories(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str] | None:
    """Sorted names of the directories directly under `url`; None when `url` is not a directory."""
    fs, path = filesystem(url, storage_options)
    if not fs.isdir(path):
        return None
    entries = fs.ls(path, detail=True)
    return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e.get("type") == "directory")


def files_below(url: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """Sorted URLs of every file below the directory `url`, recursively."""
    fs, path = filesystem(url, storage_options)
    return sorted(_url(fs, p) for p in fs.find(path))


__all__ = ["files_below", "filesystem", "glob", "is_remote", "open_binary", "read_bytes", "subdirectories"]
