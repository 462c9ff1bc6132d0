"""The one class of error a user can act on.

A `UserError` says, in one line, what input was wrong and what to do (a bad recipe field, a missing
file, an unusable backend, a refused stage). The CLI prints it as `error: ...` with exit code 2, and
shows its traceback only with `--debug`. Every other exception is a bug or an environment failure
and keeps its full traceback. It subclasses ValueError so older callers that caught that still do.
"""

from __future__ import annotations


class UserError(ValueError):
    """Bad input or a refused action, explained in one line."""


class TrainingDiverged(UserError, FloatingPointError):
    """The training loss became NaN/inf: the last good checkpoint is kept, the message says what to lower."""
