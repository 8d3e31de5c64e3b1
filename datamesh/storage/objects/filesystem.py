"""Filesystem backend of the object store: ``<root>/ab/cd/abcd…`` fan-out folders.

A write goes to a temporary file in ``<root>/.staging``, is fsynced, renamed into place atomically
and the folder is fsynced, so a crash leaves either the whole object or nothing under its key.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path

from datamesh.core.errors import StorageError
from datamesh.storage.objects.base import (
    DEFAULT_CHUNK_BYTES,
    ObjectMissing,
    ObjectStore,
)

_RETRYABLE_ERRNOS = {
    errno.EAGAIN,
    errno.EINTR,
    errno.EBUSY,
    errno.ENOSPC,
    errno.EMFILE,
    errno.ENFILE,
}


class FilesystemObjectStore(ObjectStore[Path]):
    """Content-addressed objects under ``root`` on a local filesystem."""

    backend = "fs"
    stage_while_hashing = True
    reads_whole = True

    def __init__(self, root: Path, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, fsync: bool = True) -> None:
        self.root = Path(root)
        self.chunk_bytes = chunk_bytes
        self.fsync = fsync
        self._staging = self.root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)

    def path_of(self, key: str) -> Path:
        """Where the object ``key`` lives (two levels of fan-out keep folders small)."""
        return self.root / key[:2] / key[2:4] / key

    def _exists(self, key: str) -> bool:
        return self.path_of(key).is_file()

    def _stage(self, chunks: Iterable[bytes]) -> Path:
        fd, name = tempfile.mkstemp(dir=self._staging, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in chunks:
                    out.write(chunk)
                out.flush()
                if self.fsync:
                    os.fsync(out.fileno())
        except BaseException:
            Path(name).unlink(missing_ok=True)
            raise
        return Path(name)

    def _promote(self, token: Path, key: str) -> None:
        target = self.path_of(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(token, target)  # atomic; identical bytes if another writer won the race
        if self.fsync:
            _fsync_dir(target.parent)

    def _discard(self, token: Path) -> None:
        token.unlink(missing_ok=True)

    def _read_all(self, key: str) -> bytes:
        try:
            return self.path_of(key).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(key) from None

    def _open(self, key: str) -> Iterator[bytes]:
        try:
            handle = open(self.path_of(key), "rb")  # noqa: SIM115 - closed by the generator
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        with handle:
            while chunk := handle.read(self.chunk_bytes):
                yield chunk

    def _delete(self, key: str) -> bool:
        path = self.path_of(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        if self.fsync:
            _fsync_dir(path.parent)
        return True

    def _keys(self) -> Iterator[str]:
        for first in sorted(self.root.iterdir()):
            if first.name.startswith(".") or not first.is_dir():
                continue
            for second in sorted(first.iterdir()):
                if second.is_dir():
                    yield from sorted(p.name for p in second.iterdir() if p.is_file())

    def _keys_with_mtime(self) -> Iterator[tuple[str, datetime]]:
        for key in self._keys():
            try:
                mtime = self.path_of(key).stat().st_mtime
            except FileNotFoundError:  # deleted between listing and stat
                continue
            yield key, datetime.fromtimestamp(mtime, tz=UTC)

    def _sweep_staging(self, older_than: datetime) -> int:
        cutoff = older_than.timestamp()
        removed = 0
        for path in self._staging.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _translate(self, exc: Exception, operation: str) -> StorageError:
        retryable = isinstance(exc, OSError) and exc.errno in _RETRYABLE_ERRNOS
        return StorageError("objects", f"fs.{operation}", str(exc), retryable=retryable, cause=repr(exc))

    def stale_staging(self) -> list[Path]:
        """Temporary files left by interrupted writes (GC removes those older than its grace)."""
        return sorted(self._staging.iterdir())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
