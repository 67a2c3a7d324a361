"""Failures of a run that already started, as the CLI reports them (the input errors live beside
the code that checks the input: ConfigError, CheckpointError, RecipeError, PluginError)."""

from __future__ import annotations


class RunFailedError(RuntimeError):
    """A run that started and then failed; the CLI prints one line and exits with `exit_code`.

    For a launched run that failed on its workers after Ray used up its restarts, `exit_code` is 2
    when the root cause is bad input only the workers could see (a corrupt image, a label out of
    range, a data path missing on a worker's machine) and 1 otherwise. Either way the last complete
    checkpoint is kept and launching the recipe again resumes from it."""

    all_ranks = True
    """Whether every rank raises it together (so a final barrier cannot hang)."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code
