"""A shard as one SQLite file in WAL mode: ``kv(key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID``.

One writer per shard is enforced, not assumed: opening for writing takes an exclusive ``flock`` on
``<file>.lock`` and fails if another process (or another open in this one) holds it.  Readers open
the file read-only and take no lock; WAL lets them read while the writer writes.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from datamesh.storage.ap.base import ShardEngine, ShardError

_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID"
_CHUNK = 500  # keys per IN (...) lookup, under SQLite's variable limit


class SqliteShard(ShardEngine):
    """A keyed SQLite table in WAL mode with ``synchronous=FULL`` (durable on commit)."""

    def __init__(self, path: Path, *, readonly: bool = False, synchronous: str = "FULL") -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        self._lock_fd: int | None = None
        if not readonly:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._lock_fd = take_writer_lock(self.path)
        try:
            if readonly:
                uri = f"file:{self.path}?mode=ro"
                self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
            else:
                self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute(f"PRAGMA synchronous={synchronous}")
                self._db.execute(_SCHEMA)
        except sqlite3.Error:
            self._release_writer_lock()
            raise

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        self._require_writer()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.executemany("INSERT OR REPLACE INTO kv(key, value) VALUES (?, ?)", items)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        found: dict[bytes, bytes] = {}
        with self._lock:
            for start in range(0, len(keys), _CHUNK):
                chunk = list(keys[start : start + _CHUNK])
                marks = ",".join("?" * len(chunk))
                rows = self._db.execute(f"SELECT key, value FROM kv WHERE key IN ({marks})", chunk)
                found.update((bytes(k), bytes(v)) for k, v in rows)
        return found

    def delete_many(self, keys: Sequence[bytes]) -> int:
        self._require_writer()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                before = self._db.total_changes
                self._db.executemany("DELETE FROM kv WHERE key = ?", [(k,) for k in keys])
                deleted = self._db.total_changes - before
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return deleted

    def scan_prefix(self, prefix: bytes, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        upper = prefix_upper_bound(prefix)
        sql = "SELECT key, value FROM kv WHERE key >= ?" + (" AND key < ?" if upper else "") + " ORDER BY key"
        params: list[object] = [prefix]
        if upper:
            params.append(upper)
        if limit is not None:
            sql += " LIMIT ?"
            params.append(limit)
        with self._lock:  # materialise under the lock: one read transaction, a consistent snapshot
            rows = [(bytes(k), bytes(v)) for k, v in self._db.execute(sql, params)]
        return iter(rows)

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT count(*) FROM kv").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()
        self._release_writer_lock()

    def _require_writer(self) -> None:
        if self.readonly:
            raise ShardError(f"shard {self.path} is open read-only")

    def _release_writer_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def take_writer_lock(path: Path) -> int:
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ShardError(f"shard {path} already has a writer", retryable=True) from None
    return fd


def prefix_upper_bound(prefix: bytes) -> bytes | None:
    """The smallest key greater than every key starting with ``prefix`` (None: no bound)."""
    trimmed = prefix.rstrip(b"\xff")
    if not trimmed:
        return None
    return trimmed[:-1] + bytes([trimmed[-1] + 1])
