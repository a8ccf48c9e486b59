"""One run per output path: an exclusive lock file next to the output.

``OUTPUT.lock`` is created with ``O_CREAT | O_EXCL`` (atomic: of two runs, exactly one creates
it) and holds the owner's pid, host and start time. A second run on the same output refuses at
once with :class:`OutputLockedError`. The lock is removed when the owner's ``with`` block ends,
normally or by an exception; a lock left by a killed run is stale when it names this host and a
pid that is no longer alive, and is then taken over. A lock of another host is never broken
automatically (the message says how to remove it).

Locks are re-entrant within a process: a run that holds its output's lock can call helpers that
lock the same output again (:func:`llmprune.io.output.atomic_dir`).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from ..core.errors import OutputLockedError, UserError

_HELD: dict[Path, int] = {}  # lock file -> nesting depth, in this process


def lock_path(output: Path) -> Path:
    return output.parent / f"{output.name}.lock"


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this host (one owned by another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_owner(path: Path) -> dict | None:
    """The owner recorded in lock file ``path``; None when it is gone or unreadable (a lock
    being written this instant, or damaged)."""
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return owner if isinstance(owner, dict) else None


def is_stale(owner: dict | None, host: str) -> bool:
    """A lock whose owner is a dead process of this host."""
    if owner is None or owner.get("host") != host:
        return False
    pid = owner.get("pid")
    return isinstance(pid, int) and pid != os.getpid() and not pid_alive(pid)


def _create(path: Path, host: str) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": host, "started": time.time()}, f)
    return True


def acquire(output: Path) -> Path:
    """Take the lock of ``output`` (creating its parent directory) or raise OutputLockedError."""
    path = lock_path(output)
    if path in _HELD:
        _HELD[path] += 1
        return path
    host = socket.gethostname()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        created = _create(path, host)
    except OSError as exc:
        raise UserError(f"cannot create the lock file {path} of --output {output}: "
                        f"{exc.strerror}; choose another --output") from None
    if not created and is_stale(read_owner(path), host):
        created = _take_over(path, host)
    if not created:
        raise OutputLockedError(_locked_message(output, path, read_owner(path), host))
    _HELD[path] = 1
    return path


def _take_over(path: Path, host: str) -> bool:
    """Replace the stale lock ``path`` by ours. Runs taking over at once are serialised by a
    second O_EXCL file, ``LOCK.break``, so that none removes a lock another has just taken;
    the one holding it checks again that the lock is still the stale one. A ``.break`` file
    left by a killed run is itself stale by the same rule."""
    breaker = path.with_name(path.name + ".break")
    if not _create(breaker, host):
        if not is_stale(read_owner(breaker), host):
            return False
        with contextlib.suppress(FileNotFoundError):
            breaker.unlink()
        if not _create(breaker, host):
            return False
    try:
        if not is_stale(read_owner(path), host):
            return False
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return _create(path, host)
    finally:
        with contextlib.suppress(FileNotFoundError):
            breaker.unlink()


def release(path: Path) -> None:
    _HELD[path] -= 1
    if _HELD[path] == 0:
        del _HELD[path]
        owner = read_owner(path)
        if owner is not None and owner.get("pid") == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()


def _locked_message(output: Path, path: Path, owner: dict | None, host: str) -> str:
    if owner is None:
        who = "another run"
    else:
        who = f"run {owner.get('pid')} on {owner.get('host')}"
    if owner is not None and owner.get("host") not in (None, host):
        fix = f"if that run is gone, remove {path}"
    else:
        fix = "wait for it to finish or choose another --output"
    return f"--output {output} is in use by {who} (lock {path}); {fix}"


@contextlib.contextmanager
def output_lock(output: str | Path):
    """Hold the exclusive lock of ``output`` for the ``with`` block."""
    path = acquire(Path(output).expanduser().resolve())
    try:
        yield path
    finally:
        release(path)
