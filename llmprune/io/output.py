"""Atomic output directories: write into a temporary sibling, rename at the end.

A run that fails or is killed midway leaves at most a hidden ``.NAME.tmp-PID`` sibling, never a
directory at the requested path that looks complete. A user's existing directory is replaced
only with ``--overwrite``, and never before the new one is complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

from ..core.errors import OutputExistsError, UserError
from .lock import output_lock, pid_alive


def check_output(output: str | Path, overwrite: bool, sources: tuple[str, ...] = ()) -> Path:
    out = Path(output).expanduser().resolve()
    for src in sources:
        src_path = Path(src).expanduser()
        if src_path.exists() and (out == src_path.resolve() or src_path.resolve() in out.parents):
            raise UserError(f"--output {output} is the source checkpoint or inside it; "
                            "choose another directory (the source is never modified)")
    if out.exists() and not overwrite:
        raise OutputExistsError(f"output directory {output} already exists; pass --overwrite to "
                                "replace it or choose another --output")
    if out.exists() and not out.is_dir():
        raise OutputExistsError(f"--output {output} exists and is not a directory")
    _check_writable(out, "cannot write into {parent}; choose another --output")
    return out


def _existing_parent(path: Path) -> Path:
    """The nearest directory above ``path`` that exists (where creating it would start)."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    return parent


def _check_writable(path: Path, message: str) -> None:
    """UserError(``message`` with ``{parent}`` filled in) when the nearest existing directory
    above ``path`` cannot be written."""
    parent = _existing_parent(path)
    if not os.access(parent, os.W_OK):
        raise UserError(message.replace("{parent}", str(parent)))


def _remove_stale(output: Path) -> None:
    """Remove half-written temporary siblings left by runs of ``output`` that were killed (their
    pid is dead). ``.old-PID`` siblings (a replaced previous output) are left for the user."""
    for path in output.parent.glob(f".{output.name}.tmp-*"):
        pid = path.name.rsplit("-", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(output: Path, overwrite: bool):
    """Yield a temporary directory; on success rename it to ``output`` (replacing an old one
    only with ``overwrite``). The output's lock (:mod:`llmprune.io.lock`) is held throughout,
    and ``output`` is checked again under it: another run may have written it meanwhile."""
    with output_lock(output):
        check_output(output, overwrite)
        _remove_stale(output)
        tmp = output.parent / f".{output.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            yield tmp
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        publish_dir(tmp, output)


def publish_dir(done: Path, output: Path) -> None:
    """Rename the finished directory ``done`` to ``output``; an existing ``output`` (allowed by
    --overwrite) is moved aside first and removed only after the rename."""
    if output.exists():
        trash = output.parent / f".{output.name}.old-{os.getpid()}"
        os.replace(output, trash)
        os.replace(done, output)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(done, output)


def check_file_output(path: str | Path) -> Path:
    """A file we are about to write: its directory must exist (or be creatable) and be writable."""
    out = Path(path).expanduser().resolve()
    if out.is_dir():
        raise UserError(f"{path} is a directory; give a file name for the JSON output")
    _check_writable(out, f"cannot write {path}: {{parent}} is not writable")
    return out


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries (a rename inside it) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str, durable: bool = False) -> None:
    """Write a small file through a temporary sibling and a rename: never half-written. With
    ``durable`` the file and the rename are flushed to disk before returning (a crash right
    after leaves either the old file or the new one)."""
    out = Path(path).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        if durable:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, out)
    if durable:
        fsync_dir(out.parent)
