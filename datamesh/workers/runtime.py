"""Per-process state of a worker: the tiers, the shard leases, the Redis client, the fault hook, the indexes.

Everything is opened lazily in the process that uses it: a prefork child must not reuse the parent's
database sockets (``after_fork`` disposes the CP engine's pool for that reason) nor its shard locks.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import redis

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import StorageError
from datamesh.core.result import Err, Result
from datamesh.core.types import GeoRegion
from datamesh.pipeline.indexer import IndexerSettings
from datamesh.pipeline.saga import FaultHook, _no_faults
from datamesh.pipeline.tiers import Tiers, engine_for, readonly_engine_for
from datamesh.storage.ap.base import ShardEngine
from datamesh.storage.ap.fenced import advance_fence, fenced_engine, read_fence
from datamesh.storage.ap.store import ContentStore, EngineFactory
from datamesh.storage.cp.sagas import FINAL_STATUSES
from datamesh.storage.index import MiniLMEmbedder, RegionalIndexes
from datamesh.workers.leases import ShardLeases

DONE_KEY = "dm:saga-done:{}"
_DONE_TTL_S = 3600


@dataclass(slots=True)
class Runtime:
    config: DataMeshConfig = field(default_factory=DataMeshConfig)
    node: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    faults: FaultHook = _no_faults
    _tiers: Tiers | None = None
    _redis: redis.Redis | None = None
    _leases: ShardLeases | None = None
    _indexes: RegionalIndexes | None = None
    _search_indexes: RegionalIndexes | None = None
    _index_tiers: Tiers | None = None
    _reader_ap: ContentStore | None = None
    _index_settings: IndexerSettings | None = None

    def configure(self, config: DataMeshConfig) -> None:
        self.close()
        self.config = config

    def tiers(self) -> Tiers:
        if self._tiers is None:
            opened = Tiers.open(
                self.config,
                engine_factory=fenced_engine(self.token, engine_for(self.config.ap_engine, self.config)),
                queued=True,  # a worker hands every saga it touches to a queue for the next step
            )
            self._tiers = opened.unwrap()
        return self._tiers

    def indexes(self) -> RegionalIndexes:
        """This process's regional indexes, opened for writing on first use (held until shutdown)."""
        if self._indexes is None:
            self._indexes = RegionalIndexes(self.config.resolved_index_dir)
        return self._indexes

    def search_indexes(self) -> RegionalIndexes:
        """The regional indexes a search task reads: the files opened read-only (held until shutdown).

        Read-only even in a process that also writes them (an ``all`` pool's single process): a
        search then sees what any reader of the files sees, and never waits on the writer's lock.
        """
        if self._search_indexes is None:
            self._search_indexes = RegionalIndexes(self.config.resolved_index_dir, readonly=True)
        return self._search_indexes

    def index_tiers(self) -> Tiers:
        """The tiers the index drains use: AP content read without the shards' writer locks.

        An index worker reads turns of shards other processes write, and writes none: an erasure's
        AP deletes go to the shards' owners (:mod:`datamesh.tasks.erasure`).
        """
        if self._index_tiers is None:
            self._index_tiers = dataclasses.replace(self.tiers(), ap=self.reader_ap())
        return self._index_tiers

    def reader_ap(self) -> ContentStore:
        """AP reads without taking a shard: through this worker's writer where it has the shard
        open, read-only otherwise (:class:`_ReaderAp`).  Index drains and the reads routed to this
        worker as a shard's owner (:mod:`datamesh.tasks.reads`) use it."""
        if self._reader_ap is None:
            self._reader_ap = _ReaderAp(
                self.config.resolved_ap_dir,
                self.config.ap_shards,
                writer=self.tiers().ap,
                reader=readonly_engine_for(self.config.ap_engine),
            )
        return self._reader_ap

    def index_settings(self) -> IndexerSettings:
        if self._index_settings is None:
            embedder = MiniLMEmbedder.load().unwrap() if self.config.embedder == "minilm" else None
            self._index_settings = IndexerSettings(batch=self.config.index_batch, embedder=embedder)
        return self._index_settings

    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.config.broker_url, socket_timeout=10)
        return self._redis

    def leases(self) -> ShardLeases:
        if self._leases is None:
            self._leases = ShardLeases(
                self.redis(),
                self.node,
                ttl_s=self.config.shard_lease_s,
                fence_of=self._fence_of,
                fence_to=self._fence_to,
            )
        return self._leases

    def token(self, region: str, shard: int) -> int | None:
        return self.leases().token(region, shard)

    def serves(self, region: str) -> bool:
        """Residency: a worker started for some regions writes only their content."""
        return not self.config.worker_regions or region in self.config.worker_regions

    def notify(self, saga_id: str, status: str) -> None:
        """:func:`announce` the saga's status on this worker's broker."""
        announce(self.redis(), saga_id, status)

    def after_fork(self) -> None:
        """In a new child: drop connections inherited from the parent without closing the parent's."""
        if self._tiers is not None:
            self._tiers.cp.engine.dispose(close=False)
            self._tiers = None
        self._redis = None
        self._leases = None
        self._indexes = None  # the parent's (if any) stay the parent's; this child opens its own
        self._search_indexes = None
        self._index_tiers = None
        self._reader_ap = None

    def close(self) -> None:
        if self._leases is not None:
            with contextlib.suppress(redis.RedisError):
                self._leases.release_all()
        for indexes in (self._indexes, self._search_indexes):
            if indexes is not None:
                indexes.close()
        if self._reader_ap is not None:
            self._reader_ap.close()
        self._reader_ap = None
        self._index_tiers = None
        if self._tiers is not None:
            self._tiers.close()
        self._indexes = None
        self._search_indexes = None
        self._tiers = None
        self._leases = None
        self._redis = None

    def _fence_path(self, region: str, shard: int) -> Path:
        return self.tiers().ap.shard_path_for(region, shard).with_suffix(".fence")

    def _fence_of(self, region: str, shard: int) -> int:
        return read_fence(self._fence_path(region, shard))

    def _fence_to(self, region: str, shard: int, token: int) -> None:
        path = self._fence_path(region, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        advance_fence(path, token)


def announce(client: redis.Redis, saga_id: str, status: str) -> None:
    """Wake a caller waiting for the saga (a hint only: the saga log in CP is the record); at a
    final state, drop the saga's stashed content (no step will read it again; it expires anyway).

    Whoever settles a saga calls it: the step and undo tasks, and the reaper, wherever it runs.
    Best effort: on a Redis error the caller falls back to polling the saga log and the stash
    expires after its TTL."""
    from datamesh.tasks.codec import stash_key

    try:
        key = DONE_KEY.format(saga_id)
        pipe = client.pipeline()
        pipe.lpush(key, status)
        pipe.expire(key, _DONE_TTL_S)
        if status in FINAL_STATUSES:
            pipe.delete(stash_key(saga_id))
        pipe.execute()
    except redis.RedisError:
        pass


class _ReaderAp(ContentStore):
    """AP reads without writer locks (read-only shards), or through this worker's own writer where
    it has the shard open; no writes.

    A shard this process writes is read through its writer, which sees the newest writes at once
    (read-your-writes, memtable included), so an index drain that runs where the turns were written
    never waits for a flush, and a read routed to the shard's owner finds a turn as soon as its
    batch was acknowledged; other shards (and a shard its owner has not written since it started)
    are read as last flushed, waiting for keys not visible yet (``readonly_engine_for``).  An
    erasure's deletes are not made here: the index drain hands them to the shards' owners
    (``IndexerSettings.hand_off_ap``).
    """

    def __init__(self, root: Path, shard_count: int, *, writer: ContentStore, reader: EngineFactory) -> None:
        super().__init__(root, shard_count, engine_factory=reader)
        self._writer = writer

    def _engine(self, region: GeoRegion, shard: int) -> ShardEngine:
        owned = self._writer.open_engine(region, shard)
        return owned if owned is not None else super()._engine(region, shard)

    def delete_many(self, region: GeoRegion, keys: Sequence[bytes]) -> Result[int, StorageError]:
        message = "AP reads do not write shards: their owners run an erasure's deletes (delete_ap)"
        return Err(StorageError("ap", "delete_many", message))


#: The worker process's runtime (configured by the Celery app; tasks read it).
RUNTIME = Runtime()
