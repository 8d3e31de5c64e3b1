"""Filesystem backend of the object store: ``<root>/ab/cd/abcd…`` fan-out folders.

A write goes to a temporary file in ``<root>/.staging``, is fsynced, renamed into place atomically
and the folder is fsynced, so a crash leaves either the whole object or nothing under its key.  A
fan-out folder the write had to create is fsynced in its parent too, or the crash could lose it
(POSIX promises nothing more; that journalling filesystems happen to commit it with the child's
sync is not relied on).  The extra flush is paid only by a put that finds its folder missing, at
most 65,792 times over a store's life, so a young store's small puts are slower than a settled one's.

A small put costs a handful of syscalls (stat, open, write, fsync, close, rename, and the folder's
open/fsync/close), so the hot path uses ``os`` calls on string paths rather than pathlib or tempfile.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import stat
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
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC


class FilesystemObjectStore(ObjectStore[str]):
    """Content-addressed objects under ``root`` on a local filesystem."""

    backend = "fs"
    stage_while_hashing = True

    def __init__(self, root: Path, *, chunk_bytes: int = DEFAULT_CHUNK_BYTES, fsync: bool = True) -> None:
        self.root = Path(root)
        self.chunk_bytes = chunk_bytes
        self.fsync = fsync
        self._staging = self.root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)
        # Paths are plain strings on the hot path: pathlib costs more than the syscalls of a small put.
        self._root_str = os.fspath(self.root)
        # Staging names: a random tag per store plus a counter (O_EXCL catches the rare clash,
        # e.g. after a fork), instead of mkstemp's random name per put.
        self._staging_prefix = os.path.join(os.fspath(self._staging), f"put-{os.urandom(6).hex()}-")
        self._sequence = itertools.count()

    def path_of(self, key: str) -> Path:
        """Where the object ``key`` lives (two levels of fan-out keep folders small)."""
        return Path(self._path(key))

    def _path(self, key: str) -> str:
        return f"{self._root_str}/{key[:2]}/{key[2:4]}/{key}"

    def _exists(self, key: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(self._path(key)).st_mode)
        except FileNotFoundError:
            return False

    def _write(self, key: str, data: bytes) -> bool:
        if self._exists(key):
            return False
        self._publish(self._stage((data,), durable=True), key)
        return True

    def _stage(self, chunks: Iterable[bytes], *, durable: bool = False) -> str:
        """Write ``chunks`` to a new staging file; fsynced only with ``durable``.

        A staged write whose hash turns out to be stored already is discarded unsynced, so a
        dedup put costs no disk flush; :meth:`_promote` syncs it before it is published.
        """
        fd, name = self._create_staging_file()
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
            if durable and self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise
        os.close(fd)
        return name

    def _create_staging_file(self) -> tuple[int, str]:
        while True:
            name = f"{self._staging_prefix}{next(self._sequence)}"
            try:
                return os.open(name, _CREATE_FLAGS, 0o600), name
            except FileExistsError:
                continue

    def _flush_staged(self, token: str) -> None:
        if self.fsync:
            fd = os.open(token, _READ_FLAGS)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _promote(self, token: str, key: str) -> None:
        self._flush_staged(token)  # the staged bytes reach the disk before their name does (cheap if flushed)
        self._publish(token, key)

    def _publish(self, token: str, key: str) -> None:
        """Rename the synced staging file ``token`` to ``key`` and sync the folder."""
        target = self._path(key)
        try:
            os.replace(token, target)  # atomic; identical bytes if another writer won the race
        except FileNotFoundError:
            if not os.path.exists(token):
                raise
            self._make_folders(key)
            os.replace(token, target)
        if self.fsync:
            _fsync_dir(target[: -len(key) - 1])

    def _make_folders(self, key: str) -> None:
        """Create the fan-out folders of ``key``; each new folder's entry is fsynced in its parent."""
        first = f"{self._root_str}/{key[:2]}"
        second = f"{first}/{key[2:4]}"
        try:
            os.mkdir(second)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):  # another writer made it
                os.mkdir(first)
            if self.fsync:
                _fsync_dir(self._root_str)
            with contextlib.suppress(FileExistsError):
                os.mkdir(second)
        except FileExistsError:  # another writer made it; fsync its entry anyway before acknowledging
            pass
        if self.fsync:
            _fsync_dir(first)

    def _discard(self, token: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(token)

    def _read_all(self, key: str) -> bytes:
        try:
            fd = os.open(self._path(key), _READ_FLAGS)
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        try:
            size = os.fstat(fd).st_size
            data = os.read(fd, size)
            if len(data) == size:  # the usual case: one read, no EOF probe (objects never grow)
                return data
            parts = [data]  # a short read (objects beyond the largest single read)
            while chunk := os.read(fd, self.chunk_bytes):
                parts.append(chunk)
            return b"".join(parts)
        finally:
            os.close(fd)

    def _digest(self, key: str) -> tuple[str, int]:
        # One buffer read into over and over stays in the CPU cache: hashing runs near its own rate.
        try:
            fd = os.open(self._path(key), _READ_FLAGS)
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        try:
            buffer = bytearray(self.chunk_bytes)
            view = memoryview(buffer)
            sha = hashlib.sha256()
            size = 0
            while count := os.readv(fd, [buffer]):
                sha.update(view[:count])
                size += count
            return sha.hexdigest(), size
        finally:
            os.close(fd)

    def _open(self, key: str) -> Iterator[bytes]:
        try:
            fd = os.open(self._path(key), _READ_FLAGS)
        except FileNotFoundError:
            raise ObjectMissing(key) from None
        try:
            while chunk := os.read(fd, self.chunk_bytes):
                yield chunk
        finally:
            os.close(fd)

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


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may be short)."""
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)
        while written < len(data):
            written += os.write(fd, view[written:])


def _fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
