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


class SpecError(UserError):
    """A bad value in one of the library's own specs (QuantSpec, KDSpec, TraceSpec, a task). `field` is
    the spec's key (`group_size`, `generation.keep`); the code that built the spec from what the user
    wrote (stages/specs.py for a recipe, the CLI for its flags) re-raises it naming that key instead,
    so a message never names a recipe path the user did not write."""

    def __init__(self, field: str, message: str):
        self.field, self.message = field, message
        super().__init__(f"{field}: {message}")
