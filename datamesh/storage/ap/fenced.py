"""Fencing tokens for shard writers, and a read-only view of shards for processes that never write.

A shard has one writer, chosen by a lease (see :mod:`datamesh.workers.leases`).  A lease can expire
while its holder is paused (a long GC, a stopped VM, a partition) and a second writer takes over; when
the first wakes it must not write.  So every lease comes with a token that only grows, and the shard
remembers the highest token it has seen (``shard-NNN.fence``, written atomically): a write carrying a
lower token is refused.  The check runs while the writer holds the shard's exclusive ``flock``, so no
other writer can advance the fence between the check and the write.

:class:`ReadOnlyShard` serves readers (the API process, tests, the CLI) without taking the writer lock
and tolerates shards that do not exist yet.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from datamesh.core.durable import replace_durably
from datamesh.storage.ap.base import ShardEngine, ShardError
from datamesh.storage.ap.sqlite_shard import SqliteShard
from datamesh.storage.ap.store import shard_address

#: ``token(region, shard)``: the fencing token this process holds for a shard, or None without a lease.
TokenSource = Callable[[str, int], int | None]


def read_fence(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except FileNotFoundError:
        return 0


def advance_fence(path: Path, token: int) -> None:
    """Record ``token`` as the highest seen, durably: a synced temporary file renamed over the old
    one, then the folder synced, so a crash cannot bring back an older token (and with it a
    fenced-off writer)."""
    replace_durably(path, str(token).encode())


class _Wrapped(ShardEngine):
    """A shard engine around another, passing every call through (subclasses change some)."""

    _inner: ShardEngine

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        self._inner.put_many(items)

    def delete_many(self, keys: Sequence[bytes]) -> int:
        return self._inner.delete_many(keys)

    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        return self._inner.get_many(keys)

    def scan_prefix(self, prefix: bytes, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        return self._inner.scan_prefix(prefix, limit)

    def count(self) -> int:
        return self._inner.count()

    def close(self) -> None:
        self._inner.close()


class FencedShard(_Wrapped):
    """A writer engine whose every write first checks the process's token against the shard's fence."""

    def __init__(self, inner: ShardEngine, fence_path: Path, token: Callable[[], int | None]) -> None:
        self._inner = inner
        self.fence_path = fence_path
        self._token = token

    def _check(self) -> None:
        token = self._token()
        if token is None:
            raise ShardError(f"no lease on {self.fence_path.with_suffix('')}: not this process's shard", retryable=True)
        seen = read_fence(self.fence_path)
        if token < seen:
            raise ShardError(
                f"fenced off: token {token} is older than {seen}, another writer owns the shard", retryable=True
            )
        if token > seen:
            advance_fence(self.fence_path, token)

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        self._check()
        self._inner.put_many(items)

    def delete_many(self, keys: Sequence[bytes]) -> int:
        self._check()
        return self._inner.delete_many(keys)


def fenced_engine(tokens: TokenSource, inner: Callable[[Path], ShardEngine]) -> Callable[[Path], ShardEngine]:
    """An engine factory for ``ContentStore`` whose shards check ``tokens`` before every write.

    ``path`` is ``<ap_dir>/<region>/shard-NNN``, so region and shard come from the path.
    """

    def factory(path: Path) -> ShardEngine:
        region, shard = shard_address(path)
        return FencedShard(inner(path), path.with_suffix(".fence"), lambda: tokens(region, shard))

    return factory


class ReadOnlyShard(ShardEngine):
    """Reads a SQLite shard without its writer lock; a shard not created yet reads as empty."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db: SqliteShard | None = None

    def _open(self) -> SqliteShard | None:
        if self._db is None and self.path.exists():
            self._db = SqliteShard(self.path, readonly=True)
        return self._db

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        raise ShardError(f"shard {self.path} is open read-only")

    def delete_many(self, keys: Sequence[bytes]) -> int:
        raise ShardError(f"shard {self.path} is open read-only")

    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        db = self._open()
        return db.get_many(keys) if db else {}

    def scan_prefix(self, prefix: bytes, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        db = self._open()
        return db.scan_prefix(prefix, limit) if db else iter(())

    def count(self) -> int:
        db = self._open()
        return db.count() if db else 0

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def readonly_engine(path: Path) -> ShardEngine:
    return ReadOnlyShard(path.with_suffix(".sqlite3"))


class VisibleAfterFlush(_Wrapped):
    """A read-only view of a shard whose newest writes reach readers only when its owner flushes.

    An LSM shard's owner keeps recent batches in its memtable and flushes it at least every
    ``flush_interval_s``; a reader in another process sees them from then on.  Keys are looked up
    because the CP tier committed them, so a key not found yet is most likely a write still in the
    owner's memtable: ``get_many`` looks again until every key is found or ``wait_s`` (the flush
    bound plus a margin) has passed.  Keys still missing then may sit in the log of an owner that
    died before flushing them, with no new owner yet (one takes the shard on its next write):
    ``recover`` (if given) replays such a log when no process holds the shard's writer lock, and
    the keys are looked up once more.  What is still missing is returned missing (the caller names
    it).  Scans and counts are not waited for: they show what is flushed.
    """

    def __init__(
        self, inner: ShardEngine, wait_s: float, *, poll_s: float = 0.05, recover: Callable[[], bool] | None = None
    ) -> None:
        self._inner = inner
        self.wait_s = wait_s
        self._poll_s = poll_s
        self._recover = recover

    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        found = dict(self._inner.get_many(keys))
        missing = set(keys).difference(found)
        deadline = time.monotonic() + self.wait_s
        while missing and time.monotonic() < deadline:
            time.sleep(self._poll_s)
            more = self._inner.get_many(list(missing))
            found.update(more)
            missing.difference_update(more)
        if missing and self._recover is not None and self._recover():
            more = self._inner.get_many(list(missing))
            found.update(more)
        return found
