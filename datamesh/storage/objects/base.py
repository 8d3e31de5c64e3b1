"""The content-addressed object store: the interface every backend implements.

The base class owns the public behaviour — hashing while writing, deduplication, verification on
every read, translation of backend failures into ``StorageError`` — and a backend implements a few
private methods over its medium (a folder, an S3 bucket).  Keys are SHA-256 hex digests; an object,
once stored, never changes.

Writing is two-phase so that a stream can be hashed as it is written: ``_stage`` stores the bytes
under a temporary name and returns a token, then ``_promote`` publishes them under their hash (or
``_discard`` drops them when the hash is already present).  Readers therefore never see a partly
written object.  When the hash is known before writing (``put`` of bytes), ``_write`` may publish
directly; its default is stage-then-promote.

For garbage collection, ``list_with_mtime`` lists keys with their last-modified time and
``sweep_staging`` removes what interrupted writes left behind; deciding *which* objects are garbage is
the CP tier's job (reference counts), never the store's.
"""

from __future__ import annotations

import builtins
import contextlib
import hashlib
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from typing import BinaryIO, Generic, TypeVar, cast

from datamesh.core.errors import IntegrityError, NotFound, StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import ContentHash
from datamesh.observability.instrument import tier_call

DEFAULT_CHUNK_BYTES = 1024 * 1024
#: Puts at least this large overlap hashing with staging where the backend allows it.
OVERLAP_MIN_BYTES = 1024 * 1024


class ThreadPool:
    """A thread pool made on first use, and made again in a forked child.

    A child inherits the parent's executor without its threads (a Celery prefork worker, say), so
    work submitted there would wait forever.
    """

    def __init__(self, workers: int, name: str) -> None:
        self.workers = workers
        self.name = name
        self._pool: ThreadPoolExecutor | None = None
        self._pid = 0
        self._lock = threading.Lock()

    def get(self) -> ThreadPoolExecutor:
        if self._pid != os.getpid():
            self._lock = threading.Lock()  # the parent's may have been held at the fork
        with self._lock:
            if self._pool is None or self._pid != os.getpid():
                self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix=self.name)
                self._pid = os.getpid()
            return self._pool

    def shutdown(self) -> None:
        with self._lock:
            if self._pool is not None and self._pid == os.getpid():
                self._pool.shutdown(wait=True)
            self._pool = None


HASHERS = ThreadPool(2, "datamesh-sha256")

Token = TypeVar("Token")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class StoredObject:
    """What a put produced: the key, the size, and whether bytes were written (``False`` = dedup)."""

    content_hash: ContentHash
    size: int
    written: bool


class ObjectMissing(Exception):
    """Raised by a backend's ``_open`` when the key is absent."""


class _Hashing:
    """Wraps an iterable of chunks, hashing and counting them as they pass."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = chunks
        self.sha = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in self._chunks:
            if chunk:
                self.sha.update(chunk)
                self.size += len(chunk)
                yield chunk


def iter_file(stream: BinaryIO, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
    """Chunks of a binary file-like object, without reading it whole."""
    while chunk := stream.read(chunk_bytes):
        yield chunk


class ObjectStore(ABC, Generic[Token]):
    """A SHA-256 content-addressed store; see the module docstring for the backend contract."""

    #: Short name used in errors and metrics (``fs``, ``s3``).
    backend: str = "objects"
    #: Staging is cheap (a local file): large puts stage while a second thread hashes.
    stage_while_hashing: bool = False

    # ---- the public behaviour -------------------------------------------------------------

    def put(self, data: bytes) -> Result[StoredObject, StorageError]:
        """Store ``data`` under its SHA-256; a second put of the same bytes writes nothing."""
        with tier_call("objects", "put") as call:
            if self.stage_while_hashing and len(data) >= OVERLAP_MIN_BYTES:
                return call.check(self._put_overlapped(data))
            content_hash = ContentHash.of(data)
            try:
                written = self._write(content_hash.hex, data)
            except Exception as exc:  # noqa: BLE001 - the one translation boundary of a backend
                return call.check(Err(self._translate(exc, "put")))
            return Ok(StoredObject(content_hash, len(data), written=written))

    def _put_overlapped(self, data: bytes) -> Result[StoredObject, StorageError]:
        """Hash on a second thread while staging the bytes (hashlib and file I/O release the GIL).

        If the hash is still running once the bytes are staged, the staged copy is flushed at once
        (``_flush_staged``), so the disk flush overlaps the hashing: for new content, the usual case,
        a put then costs about the longer of the two instead of their sum.  A dedup hit found that
        way has flushed a copy it then deletes; one whose hash was ready first flushes nothing.
        Either way it leaves the stored object untouched.
        """
        hashing = HASHERS.get().submit(lambda: hashlib.sha256(data).hexdigest())
        token: Token | None = None
        try:
            token = self._stage([data])
            if not hashing.done():
                self._flush_staged(token)
            content_hash = ContentHash(hashing.result())
            if self._holds(content_hash.hex, len(data)):
                self._discard(token)
                return Ok(StoredObject(content_hash, len(data), written=False))
            self._promote(token, content_hash.hex)
        except Exception as exc:  # noqa: BLE001
            if token is not None:
                self._discard_quietly(token)
            return Err(self._translate(exc, "put"))
        return Ok(StoredObject(content_hash, len(data), written=True))

    def put_stream(self, chunks: Iterable[bytes] | BinaryIO) -> Result[StoredObject, StorageError]:
        """Store a stream, hashing it while it is written; memory use is one chunk."""
        with tier_call("objects", "put_stream") as call:
            source: Iterable[bytes] = iter_file(cast(BinaryIO, chunks)) if hasattr(chunks, "read") else chunks
            hashing = _Hashing(source)
            token: Token | None = None
            try:
                token = self._stage(hashing)
                content_hash = ContentHash(hashing.sha.hexdigest())
                if self._holds(content_hash.hex, hashing.size):
                    self._discard(token)
                    return Ok(StoredObject(content_hash, hashing.size, written=False))
                self._promote(token, content_hash.hex)
            except Exception as exc:  # noqa: BLE001
                if token is not None:
                    self._discard_quietly(token)
                return call.check(Err(self._translate(exc, "put_stream")))
            return Ok(StoredObject(content_hash, hashing.size, written=True))

    def get(self, content_hash: ContentHash) -> Result[bytes, StorageError | NotFound | IntegrityError]:
        """The bytes stored under ``content_hash``, verified; never returns bad bytes."""
        return self._verified(content_hash, "get", lambda: self._read_hashed(content_hash.hex))

    def read_into(
        self, content_hash: ContentHash, sink: Callable[[bytes], object]
    ) -> Result[int, StorageError | NotFound | IntegrityError]:
        """Stream the object to ``sink`` chunk by chunk and verify it at the end.

        On ``Err(IntegrityError)`` the caller must discard what ``sink`` received.
        """

        def read() -> tuple[str, int]:
            sha = hashlib.sha256()
            size = 0
            for chunk in self._open(content_hash.hex):
                sha.update(chunk)
                size += len(chunk)
                sink(chunk)
            return sha.hexdigest(), size

        return self._verified(content_hash, "get", read)

    def verify(self, content_hash: ContentHash) -> Result[int, StorageError | NotFound | IntegrityError]:
        """Re-hash one stored object; ``Ok(size)`` when intact (nothing is kept, memory is one chunk)."""
        return self._verified(content_hash, "verify", lambda: self._digest(content_hash.hex))

    def _verified(
        self, content_hash: ContentHash, operation: str, read: Callable[[], tuple[str, T]]
    ) -> Result[T, StorageError | NotFound | IntegrityError]:
        """Run ``read`` (giving the SHA-256 of what it read, and its result) as one tier call: a
        missing object is ``NotFound``, a digest other than the key ``IntegrityError``, any other
        failure the backend's ``StorageError``."""
        with tier_call("objects", operation) as call:
            try:
                actual, value = read()
            except ObjectMissing:
                return call.check(Err(NotFound("object", content_hash.hex)))
            except Exception as exc:  # noqa: BLE001 - the one translation boundary of a read
                return call.check(Err(self._translate(exc, operation)))
            if actual != content_hash.hex:
                return call.check(Err(IntegrityError(f"object {content_hash.hex}", content_hash.hex, actual)))
            return Ok(value)

    def exists(self, content_hash: ContentHash) -> Result[bool, StorageError]:
        with tier_call("objects", "exists") as call:
            try:
                return Ok(self._exists(content_hash.hex))
            except Exception as exc:  # noqa: BLE001
                return call.check(Err(self._translate(exc, "exists")))

    def delete(self, content_hash: ContentHash) -> Result[bool, StorageError]:
        """Remove an object; ``Ok(False)`` when it was already gone.  Only GC should call this."""
        with tier_call("objects", "delete") as call:
            try:
                return Ok(self._delete(content_hash.hex))
            except Exception as exc:  # noqa: BLE001
                return call.check(Err(self._translate(exc, "delete")))

    def list(self) -> Result[list[ContentHash], StorageError]:
        """Every key in the store (keys that are not SHA-256 digests are skipped)."""
        try:
            keys = [ContentHash(k) for k in self._keys() if _is_digest(k)]
        except Exception as exc:  # noqa: BLE001
            return Err(self._translate(exc, "list"))
        return Ok(keys)

    def list_with_mtime(
        self, *, older_than: datetime | None = None
    ) -> Result[builtins.list[tuple[ContentHash, datetime]], StorageError]:
        """Every key with its last-modified time (timezone-aware UTC), for garbage collection.

        With ``older_than``, only objects last modified strictly before it.  A put that found the
        object already present does not change its time.
        """
        try:
            found = [
                (ContentHash(key), mtime)
                for key, mtime in self._keys_with_mtime()
                if _is_digest(key) and (older_than is None or mtime < older_than)
            ]
        except Exception as exc:  # noqa: BLE001
            return Err(self._translate(exc, "list"))
        return Ok(found)

    def sweep_staging(self, *, older_than: datetime) -> Result[int, StorageError]:
        """Remove staged leftovers of interrupted writes started before ``older_than``; ``Ok(count)``.

        Pick ``older_than`` well before the longest write in flight (GC uses its grace period).
        """
        try:
            return Ok(self._sweep_staging(older_than))
        except Exception as exc:  # noqa: BLE001
            return Err(self._translate(exc, "sweep_staging"))

    def close(self) -> None:
        """Release resources; the default has none."""

    # ---- what a backend implements ----------------------------------------------------------

    @abstractmethod
    def _exists(self, key: str) -> bool: ...

    def _holds(self, key: str, size: int) -> bool:
        """Whether ``key`` is stored whole and durably, so a put of its ``size`` bytes writes nothing.

        The default trusts any object present (a backend that publishes only durable objects).
        """
        return self._exists(key)

    @abstractmethod
    def _stage(self, chunks: Iterable[bytes]) -> Token:
        """Write ``chunks`` under a temporary name; return a token for promote/discard.

        The staged bytes need not be durable yet (a dedup hit discards them): ``_promote`` makes
        them durable before publishing.
        """

    def _flush_staged(self, token: Token) -> None:
        """Make staged bytes durable ahead of ``_promote`` (which then has little left to flush)."""

    @abstractmethod
    def _promote(self, token: Token, key: str) -> None:
        """Publish staged bytes under ``key`` durably and atomically (a concurrent identical promote is fine)."""

    @abstractmethod
    def _discard(self, token: Token) -> None: ...

    def _write(self, key: str, data: bytes) -> bool:
        """Publish ``data`` whose hash ``key`` is known, unless present; return whether it wrote.

        Backends may skip staging or fold the existence check into the write (a conditional PUT).
        """
        if self._holds(key, len(data)):
            return False
        self._promote(self._stage([data]), key)
        return True

    def _digest(self, key: str) -> tuple[str, int]:
        """SHA-256 hex digest and size of the stored bytes; raise :class:`ObjectMissing` when absent.

        Backends may read into one reused buffer, since no chunk outlives its hashing.
        """
        sha = hashlib.sha256()
        size = 0
        for chunk in self._open(key):
            sha.update(chunk)
            size += len(chunk)
        return sha.hexdigest(), size

    def _read_hashed(self, key: str) -> tuple[str, bytes]:
        """The SHA-256 hex digest of the whole object and its bytes; raise :class:`ObjectMissing`.

        By default the object is read whole, in one allocation, then hashed once: a second thread
        only pays where the backend can hash while reading without a second copy of the bytes.
        """
        data = self._read_all(key)
        return hashlib.sha256(data).hexdigest(), data

    def _read_all(self, key: str) -> bytes:
        """The whole object; raise :class:`ObjectMissing` when absent.  Backends read it in one go."""
        return b"".join(self._open(key))

    @abstractmethod
    def _open(self, key: str) -> Iterator[bytes]:
        """Chunks of the object; raise :class:`ObjectMissing` when absent."""

    @abstractmethod
    def _delete(self, key: str) -> bool: ...

    @abstractmethod
    def _keys(self) -> Iterator[str]: ...

    @abstractmethod
    def _keys_with_mtime(self) -> Iterator[tuple[str, datetime]]:
        """Keys with their last-modified time as an aware UTC datetime."""

    @abstractmethod
    def _sweep_staging(self, older_than: datetime) -> int:
        """Delete staged leftovers older than ``older_than``; return how many were removed."""

    @abstractmethod
    def _translate(self, exc: Exception, operation: str) -> StorageError:
        """Map a backend exception to ``StorageError`` (keeping the cause, marking retryable)."""

    def _discard_quietly(self, token: Token) -> None:
        # best effort: staged leftovers are swept by GC
        with contextlib.suppress(Exception):
            self._discard(token)


def _is_digest(key: str) -> bool:
    return len(key) == 64 and all(c in "0123456789abcdef" for c in key)
