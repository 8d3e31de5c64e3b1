"""The AP tier's shard interface: an ordered key/value store with batch writes.

A shard engine holds the content of the conversations whose entity hashes to it.  Keys are bytes
and sort lexicographically; datamesh keys start with the 16-byte entity id, so a prefix scan yields
all turns of an entity.  Writes are batches: ``put_many`` is the fast path and the unit of
durability (a batch is all there or not at all after a crash).  The SQLite engine writes a keyed
table directly; the LSM engine puts a log and memtable in front of sorted runs.  Callers see only
this interface, so one replaces the other without touching them.

Engines raise :class:`ShardError` for medium failures; :class:`~datamesh.storage.ap.store.ContentStore`
translates it (and ``sqlite3`` errors) into ``StorageError`` at its one boundary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass


class ShardError(Exception):
    """A shard could not do what was asked (locked by another writer, corrupt, closed)."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class PendingRead:
    """A read begun by :meth:`ShardEngine.begin_get_many`: ``result()`` gives the values, or
    ``abandon()`` drops a read whose answer is no longer wanted."""

    result: Callable[[], Mapping[bytes, bytes]]
    abandon: Callable[[], None] = lambda: None


class ShardEngine(ABC):
    """One shard: a durable ordered map from bytes to bytes with one writer."""

    @abstractmethod
    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        """Insert or replace every item atomically and durably before returning."""

    @abstractmethod
    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        """The values of the keys present (absent keys are left out)."""

    def begin_get_many(self, keys: Sequence[bytes]) -> PendingRead:
        """Begin :meth:`get_many`, so that a reader of several shards can ask them all before it
        waits for one.  A local engine reads when the result is asked for; an engine whose reads
        travel to another process sends its question here."""
        return PendingRead(lambda: self.get_many(keys))

    @abstractmethod
    def delete_many(self, keys: Sequence[bytes]) -> int:
        """Delete the keys atomically; return how many existed.  Deleting a missing key is fine."""

    @abstractmethod
    def scan_prefix(self, prefix: bytes, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        """Items whose key starts with ``prefix``, in key order, from a consistent snapshot."""

    @abstractmethod
    def count(self) -> int:
        """How many live keys the shard holds."""

    @abstractmethod
    def close(self) -> None:
        """Flush what must be flushed and release the shard (and its writer lock)."""
