"""The two kinds of failure the CLI reports in one line: bad input (exit 2) and a run that started
and then failed (exit 1, or 2 when its root cause was bad input only the workers could see).

Every error about what a user typed or pointed at derives from `InputError`, wherever it is
raised (ConfigError, CheckpointError, RecipeError, PluginError live beside the code that checks
the input). Anything else, a plain ValueError included, is a bug: exit 1 with its traceback."""

from __future__ import annotations


class InputError(ValueError):
    """Bad input: a recipe, a path, a checkpoint, an argument. The message says what, where, and
    what is allowed; the CLI prints it as one line and exits with 2."""


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
