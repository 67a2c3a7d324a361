"""DeepSpeed reports some steps with print() and tqdm rather than its logger: its op builds ("... built
successfully", once per rank) and zero_to_fp32's consolidation ("Processing zero checkpoint", a
progress bar). Around those calls the output goes to this module's logger at INFO instead, so it
shows with `-v` and is not interleaved with the progress line otherwise."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def printed_to_log(what: str) -> Iterator[None]:
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            yield
    finally:
        for line in captured.getvalue().replace("\r", "\n").splitlines():
            if line.strip():
                log.info("%s: %s", what, line.strip())
