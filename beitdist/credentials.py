"""Credentials a recipe carries are kept out of everything a run writes down.

A recipe may hold an object store's key and secret (`storage.options`, a dataset's
`storage_options`) or a password in a URL (`tracking.uri`). The run needs them in memory, but its
checkpoints, MLflow params and `recipe.yaml` artifact are read by whoever can read the run or the
tracking server, and are copied with it. So what is recorded is `redacted(recipe)`: those values
become `REDACTED`. Reading a recorded recipe back (`evaluate`/`predict` on a run) drops them again
(`without_redacted`), so the store falls back to its environment (AWS_* variables, instance roles)
instead of being sent the placeholder as a key.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

REDACTED = "<redacted>"
"""What replaces a credential in a recorded recipe."""

STORE_OPTION_KEYS = ("storage_options",)
"""Mapping keys (at any depth) whose value is an fsspec options dict; `storage.options` too."""

_SECRET_NAME = re.compile(r"(^|_)(key|secret|token|password|passwd|credentials?|signature|connection_string)(s?)($|_)",
                          re.IGNORECASE)
"""Option names that hold credentials in fsspec's back-ends: s3fs `key`/`secret`/`token`,
botocore's `aws_access_key_id`/`aws_secret_access_key`/`aws_session_token`, gcsfs `token`, adlfs
`account_key`/`sas_token`/`connection_string`/`client_secret`."""


def is_secret_name(name: object) -> bool:
    return isinstance(name, str) and _SECRET_NAME.search(name) is not None


def redact_url(value: str) -> str:
    """The URL without its password (`user:***@host`); other strings unchanged."""
    try:
        parts = urlsplit(value)
        password = parts.password
    except ValueError:
        return value
    if not password or "@" not in parts.netloc:
        return value
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _redact_options(options: Any) -> Any:
    """An fsspec options dict with every credential-named value replaced (nested dicts such as
    `client_kwargs` too)."""
    if isinstance(options, Mapping):
        return {k: (REDACTED if is_secret_name(k) and v not in (None, "") else _redact_options(v))
                for k, v in options.items()}
    if isinstance(options, (list, tuple)):
        return [_redact_options(v) for v in options]
    return redact_url(options) if isinstance(options, str) else options


def redacted(data: Any, _path: tuple[str, ...] = ()) -> Any:
    """Plain recipe data (`Recipe.to_dict()`) as it may be recorded: store options' credentials
    and URL passwords replaced. The input is not changed."""
    if isinstance(data, Mapping):
        out = {}
        for key, value in data.items():
            path = _path + (str(key),)
            store_options = path == ("storage", "options") or key in STORE_OPTION_KEYS
            out[key] = _redact_options(value) if store_options else redacted(value, path)
        return out
    if isinstance(data, (list, tuple)):
        return [redacted(v, _path) for v in data]
    return redact_url(data) if isinstance(data, str) else data


def without_redacted(data: Any) -> Any:
    """Recorded recipe data with the placeholders dropped, ready to be parsed and used (the
    missing credentials come from the environment or `--set`)."""
    if isinstance(data, Mapping):
        return {k: without_redacted(v) for k, v in data.items() if v != REDACTED}
    if isinstance(data, list):
        return [without_redacted(v) for v in data]
    return data
