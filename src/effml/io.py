"""Atomic file writes: a reader never sees a half-written file.

Every writer here follows the same protocol: write to a uniquely named temporary file in the *same directory*
as the destination, flush and ``fsync`` it, then ``os.replace`` it onto the destination (an atomic rename on
POSIX and on Windows within one volume) and finally ``fsync`` the directory so the rename itself survives a
crash. A process killed mid-write leaves at worst a stray ``.<name>.tmp-*`` file, never a truncated
destination. Several processes may write the same destination at once (e.g. DDP ranks filling a cache): each
uses its own temporary file and the last rename wins whole.

Used for token caches, checkpoints (safetensors + JSON), reports and configs.
"""

from __future__ import annotations

import contextlib
import json
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np

__all__ = [
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_numpy",
    "check_directory_path",
    "fsync_directory",
]


def _new_file_mode() -> int:
    """Permissions an ordinary ``open(path, "w")`` would give: 0o666 minus the umask.

    ``tempfile.mkstemp`` creates files as 0o600, which would make caches and reports private to their writer. The
    umask is read from /proc (setting it to read it back would race with other threads); elsewhere 0o022 is assumed.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o644


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (a completed rename) to disk; a no-op where the OS cannot open directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike[str], mode: str = "wb", encoding: str | None = None) -> Iterator[IO[Any]]:
    """Open a temporary file for writing that replaces ``path`` atomically when the ``with`` block succeeds.

    ``mode`` is ``"wb"`` or ``"w"`` (text; ``encoding`` defaults to UTF-8). If the block raises, the temporary
    file is removed and ``path`` is left untouched. Parent directories are created as needed.
    """
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open supports mode 'wb' or 'w', got {mode!r}; open for writing a whole new file.")
    destination = Path(path)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, temp_name = tempfile.mkstemp(prefix=f".{destination.name}.tmp-", dir=destination.parent)
    try:
        handle: IO[Any] = (os.fdopen(fd, "w", encoding=encoding or "utf-8", newline="") if mode == "w"
                           else os.fdopen(fd, "wb"))
    except BaseException:
        os.close(fd)
        os.unlink(temp_name)
        raise
    try:
        with handle:
            if hasattr(os, "fchmod"):
                os.fchmod(handle.fileno(), _new_file_mode())
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_name, destination)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp_name)
        raise
    fsync_directory(destination.parent)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes | bytearray | memoryview) -> None:
    """Write ``data`` to ``path`` atomically (temp file in the same directory, fsync, rename)."""
    with atomic_open(path, "wb") as handle:
        handle.write(data)


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically; newlines are written as given (no platform translation)."""
    with atomic_open(path, "w", encoding=encoding) as handle:
        handle.write(text)


def atomic_write_json(path: str | os.PathLike[str], obj: Any, indent: int | None = 2) -> None:
    """Serialise ``obj`` as JSON (keys kept in insertion order, trailing newline) and write it atomically."""
    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False) + "\n")


def atomic_save_numpy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save ``array`` in ``.npy`` format to ``path`` atomically (loadable with ``np.load(path, mmap_mode="r")``).

    ``path`` is used exactly as given (``np.save``'s habit of appending ``.npy`` does not apply).
    """
    with atomic_open(path, "wb") as handle:
        np.save(handle, np.asarray(array), allow_pickle=False)


def check_directory_path(path: str | os.PathLike[str], what: str, fix: str) -> None:
    """Raise ValueError unless a directory can exist at ``path``: that is, unless ``path`` or one of its ancestors
    exists as something other than a directory (a file), where ``mkdir`` would fail with NotADirectoryError or
    FileExistsError. ``what`` names the setting that gave ``path`` (e.g. "--out runs"), ``fix`` ends the message.
    Creates nothing, so callers can check before doing work whose results go there. One ``stat`` per path decides,
    so a directory that another process creates meanwhile (DDP ranks filling one cache) is never taken for a file."""
    path = Path(path)
    for candidate in (path, *path.parents):
        try:
            is_directory = stat.S_ISDIR(candidate.stat().st_mode)
        except (FileNotFoundError, NotADirectoryError):
            continue  # absent, or below a file that an ancestor further up shows
        if is_directory:
            return
        raise ValueError(f"{what}: {candidate} is a file, not a directory, so the directory {path} cannot be made; "
                         f"{fix}")
