"""Typed user-facing errors.

Every mistake a user can make (a wrong path, a bad flag value, data that is too short) raises a
subclass of :class:`UserError`. The CLI prints its message on one line and exits with code 2;
nothing else in the package prints tracebacks at users. ``assert`` is kept for internal invariants.
"""

from __future__ import annotations

import re

# user:password@ (or token@) in a URL, e.g. HF_ENDPOINT=https://user:secret@hub.example
_URL_CREDENTIALS = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


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


class OutputLockedError(UserError):
    """Another run holds the lock of the output path (:mod:`llmprune.io.lock`)."""


class NonFiniteError(UserError):
    """A weight or an evaluation loss is NaN or infinite."""


class ResumableError(UserError):
    """A run stopped for a reason the user can fix (memory) and kept its work directory, so
    that ``--resume`` continues it; unlike other user errors it leaves ``OUTPUT.partial``."""


def redact(text: str) -> str:
    """``text`` with the credentials of every URL in it replaced by ``***``."""
    return _URL_CREDENTIALS.sub(r"\g<scheme>***@", text)
