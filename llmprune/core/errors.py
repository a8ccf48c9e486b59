"""Typed user-facing errors.

Every mistake a user can make (a wrong path, a bad flag value, data that is too short) raises a
subclass of :class:`UserError`. The CLI prints its message on one line and exits with code 2;
nothing else in the package prints tracebacks at users. ``assert`` is kept for internal invariants.
"""

from __future__ import annotations


class UserError(Exception):
    """An error caused by the user's input. The message says what was wrong and what to do."""

    exit_code = 2


class ModelNotFoundError(UserError):
    pass


class UnsupportedArchitectureError(UserError):
    pass


class DataError(UserError):
    pass


class PatternError(UserError):
    pass


class OutputExistsError(UserError):
    pass


class CorruptCheckpointError(UserError):
    """A checkpoint file is damaged, truncated or does not match its metadata."""
