"""Small files written whole or not at all, and the folder syncs that make a new name durable.

POSIX makes a rename durable only once its folder is fsynced, so every "write a temporary file,
fsync it, rename it over the old one" ends with :func:`fsync_dir` of the folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def replace_durably(path: Path, data: bytes, *, temporary: Path | None = None, fsync: bool = True) -> None:
    """Replace ``path`` with ``data``: a synced temporary file renamed into place, then the folder
    synced.  ``temporary`` defaults to ``<name>.<pid>.tmp`` beside it (processes never share one);
    with ``fsync=False`` nothing is synced (tests, throwaway stores)."""
    temporary = temporary or path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        if fsync:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    if fsync:
        fsync_dir(path.parent)


def fsync_dir(path: str | Path) -> None:
    """fsync a folder, so that the names made or removed in it survive a crash."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
