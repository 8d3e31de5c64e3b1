"""The AP tier: per-region sets of shards, chosen by a stable hash of the entity id.

:class:`ContentStore` is what the pipeline talks to.  It routes each key to
``<ap_dir>/<region>/shard-NNN`` by the first 16 bytes of the key (the entity id), opens shards
lazily through an engine factory (SQLite today, the LSM later), and is the single place where shard
and ``sqlite3`` failures become ``StorageError`` — and where AP calls are counted, timed and traced.
"""

from __future__ import annotations

import hashlib
import sqlite3
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from datamesh.core.errors import StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import EntityId, GeoRegion
from datamesh.observability.instrument import tier_call
from datamesh.storage.ap.base import PendingRead, ShardEngine, ShardError
from datamesh.storage.ap.sqlite_shard import SqliteShard

EngineFactory = Callable[[Path], ShardEngine]
T = TypeVar("T")


def shard_for(entity_bytes: bytes, shard_count: int) -> int:
    """Stable across processes and versions: BLAKE2b of the entity id, modulo the shard count."""
    digest = hashlib.blake2b(entity_bytes[:16], digest_size=8).digest()
    return int.from_bytes(digest, "big") % shard_count


def shard_address(path: Path) -> tuple[str, int]:
    """``(region, shard)`` of a shard path ``<ap_dir>/<region>/shard-NNN`` (what an engine factory gets)."""
    return path.parent.name, int(path.name.rsplit("-", 1)[1])


def default_engine(path: Path) -> ShardEngine:
    return SqliteShard(path.with_suffix(".sqlite3"))


class ContentStore:
    """Routes turn content to region shards; every method returns a ``Result``."""

    def __init__(
        self,
        root: Path,
        shard_count: int,
        *,
        engine_factory: EngineFactory = default_engine,
    ) -> None:
        if shard_count < 1:
            raise ValueError("shard_count must be at least 1")
        self.root = Path(root)
        self.shard_count = shard_count
        self._factory = engine_factory
        self._shards: dict[tuple[GeoRegion, int], ShardEngine] = {}
        self._open_lock = threading.Lock()

    def shard_path(self, region: GeoRegion, shard: int) -> Path:
        return self.root / region.value / f"shard-{shard:03d}"

    def shard_path_for(self, region: str, shard: int) -> Path:
        return self.root / region / f"shard-{shard:03d}"

    def shard_of(self, entity: EntityId) -> int:
        return shard_for(entity.value.bytes, self.shard_count)

    def put_many(self, region: GeoRegion, items: Sequence[tuple[bytes, bytes]]) -> Result[int, StorageError]:
        """Write every item to its shard; each shard's part is atomic and durable."""
        return self._each_shard(
            region,
            items,
            lambda engine, part: (engine.put_many(part), len(part))[1],
            "put_many",
        )

    def get_many(self, region: GeoRegion, keys: Sequence[bytes]) -> Result[dict[bytes, bytes], StorageError]:
        """The values of the keys present, from every shard they fall in; each shard is asked
        before any answer is awaited (engines reading through another process ask them at once)."""
        groups = self._by_shard(keys, lambda key: key)
        found: dict[bytes, bytes] = {}
        begun: list[PendingRead] = []
        settled = 0  # reads whose result was asked for
        with tier_call("ap", "get_many", region.value) as call:
            try:
                for shard in sorted(groups):
                    begun.append(self._engine(region, shard).begin_get_many(groups[shard]))
                for read in begun:
                    settled += 1
                    found.update(read.result())
            except (ShardError, sqlite3.Error, OSError) as exc:
                for read in begun[settled:]:
                    read.abandon()
                return call.check(Err(_translate(exc, "get_many")))
        return Ok(found)

    def delete_many(self, region: GeoRegion, keys: Sequence[bytes]) -> Result[int, StorageError]:
        """Delete keys (missing keys are fine); returns how many existed."""
        return self._each_shard(
            region,
            [(k, b"") for k in keys],
            lambda e, part: e.delete_many([k for k, _ in part]),
            "delete_many",
        )

    def scan_entity(
        self, region: GeoRegion, entity: EntityId, limit: int | None = None
    ) -> Result[list[tuple[bytes, bytes]], StorageError]:
        return self.scan_prefix(region, entity.value.bytes, limit, operation="scan_entity")

    def scan_prefix(
        self, region: GeoRegion, prefix: bytes, limit: int | None = None, *, operation: str = "scan_prefix"
    ) -> Result[list[tuple[bytes, bytes]], StorageError]:
        """Items whose key starts with ``prefix`` (at least the 16 bytes of an entity id, which
        choose the shard), in key order."""
        with tier_call("ap", operation, region.value) as call:
            try:
                engine = self._engine(region, shard_for(prefix, self.shard_count))
                return Ok(list(engine.scan_prefix(prefix, limit)))
            except (ShardError, sqlite3.Error, OSError) as exc:
                return call.check(Err(_translate(exc, operation)))

    def count(self, region: GeoRegion) -> Result[int, StorageError]:
        """Live keys of every shard of ``region``."""
        return self._count(region, range(self.shard_count))

    def count_shard(self, region: GeoRegion, shard: int) -> Result[int, StorageError]:
        """Live keys of one shard."""
        return self._count(region, [shard])

    def _count(self, region: GeoRegion, shards: Sequence[int]) -> Result[int, StorageError]:
        with tier_call("ap", "count", region.value) as call:
            try:
                return Ok(sum(self._engine(region, n).count() for n in shards))
            except (ShardError, sqlite3.Error, OSError) as exc:
                return call.check(Err(_translate(exc, "count")))

    def open_shard(self, region: GeoRegion, shard: int) -> Result[None, StorageError]:
        """Open a shard now (for a writer: take its lock), so a lock held elsewhere shows up here."""
        try:
            self._engine(region, shard)
        except (ShardError, sqlite3.Error, OSError) as exc:
            return Err(_translate(exc, "open_shard"))
        return Ok(None)

    def open_engine(self, region: GeoRegion, shard: int) -> ShardEngine | None:
        """The shard's engine if this store has it open already (never opened here)."""
        return self._shards.get((region, shard))

    def close_shard(self, region: GeoRegion, shard: int) -> None:
        """Close one shard (a writer releases its lock, e.g. when it lost the shard's lease)."""
        with self._open_lock:
            engine = self._shards.pop((region, shard), None)
        if engine is not None:
            engine.close()

    def close(self) -> None:
        with self._open_lock:
            shards, self._shards = self._shards, {}
        for engine in shards.values():
            engine.close()

    def _each_shard(
        self,
        region: GeoRegion,
        items: Sequence[tuple[bytes, bytes]],
        action: Callable[[ShardEngine, list[tuple[bytes, bytes]]], int],
        operation: str,
    ) -> Result[int, StorageError]:
        groups = self._by_shard(items, lambda item: item[0])
        total = 0
        with tier_call("ap", operation, region.value) as call:
            try:
                for shard in sorted(groups):
                    total += action(self._engine(region, shard), groups[shard])
            except (ShardError, sqlite3.Error, OSError) as exc:
                return call.check(Err(_translate(exc, operation)))
        return Ok(total)

    def _by_shard(self, things: Sequence[T], key_of: Callable[[T], bytes]) -> dict[int, list[T]]:
        """``things`` grouped by the shard their key falls in (order kept within a shard)."""
        groups: dict[int, list[T]] = defaultdict(list)
        for thing in things:
            groups[shard_for(key_of(thing), self.shard_count)].append(thing)
        return groups

    def _engine(self, region: GeoRegion, shard: int) -> ShardEngine:
        key = (region, shard)
        engine = self._shards.get(key)
        if engine is None:
            with self._open_lock:
                engine = self._shards.get(key)
                if engine is None:
                    engine = self._factory(self.shard_path(region, shard))
                    self._shards[key] = engine
        return engine


def _translate(exc: Exception, operation: str) -> StorageError:
    retryable = isinstance(exc, ShardError) and exc.retryable
    if isinstance(exc, sqlite3.OperationalError):
        retryable = "locked" in str(exc) or "busy" in str(exc)
    return StorageError("ap", operation, str(exc), retryable=retryable, cause=repr(exc))
