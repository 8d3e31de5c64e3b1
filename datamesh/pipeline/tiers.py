"""The storage tiers a saga step works on, opened from one configuration."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from datamesh.core.config import DataMeshConfig, check_saga_timeouts
from datamesh.core.errors import ConfigError, StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.storage.ap.base import ShardEngine, ShardError
from datamesh.storage.ap.fenced import VisibleAfterFlush, readonly_engine
from datamesh.storage.ap.store import ContentStore, EngineFactory, default_engine
from datamesh.storage.cp import migrate, replication
from datamesh.storage.cp.database import CpDatabase
from datamesh.storage.index import IndexReader, RegionalIndexes
from datamesh.storage.objects.router import ObjectStoreRouter, open_object_stores, open_object_stores_from


@dataclass(slots=True)
class Tiers:
    """Handles on the CP database, the AP shards and the object stores.

    ``lease_s`` is the lease of a saga whose step is running (``begin_step``); ``queue_lease_s`` the
    lease of a saga handed to a queue for its next step (created, a step recorded done, an undo
    recorded, a compensation enqueued): the queue timeout under the Celery executor, ``lease_s``
    in-process, where no saga waits in a queue.
    """

    cp: CpDatabase
    ap: ContentStore
    objects: ObjectStoreRouter
    lease_s: float
    inline_max_bytes: int
    queue_lease_s: float

    @classmethod
    def open(
        cls,
        config: DataMeshConfig,
        *,
        engine_factory: EngineFactory | None = None,
        auto_migrate: bool | None = None,
        queued: bool | None = None,
    ) -> Result[Tiers, ConfigError | StorageError]:
        """Open every tier; SQLite CP databases are migrated to the latest schema on open.

        With ``cp_require_sync_replication`` the CP database must commit synchronously to a
        streaming standby, or nothing opens (RPO=0 is a start condition, not a hope).  ``queued``:
        sagas wait in queues between their steps (default: under the Celery executor), so a saga
        handed to a queue gets ``saga_queue_timeout_s`` rather than ``saga_lease_s``.
        """
        timeouts = check_saga_timeouts(config)
        if timeouts is not None:
            return Err(timeouts)
        queued = config.executor == "celery" if queued is None else queued
        queue_lease_s = config.saga_queue_timeout_s if queued else config.saga_lease_s
        db = CpDatabase.open(config.resolved_cp_url, commit_timeout_s=config.cp_commit_timeout_s)
        if isinstance(db, Err):
            return db
        cp = db.value
        if config.cp_require_sync_replication:
            synced = replication.check_sync_replication(cp)
            if isinstance(synced, Err):
                cp.dispose()
                return synced
        migrate_now = cp.dialect == "sqlite" if auto_migrate is None else auto_migrate
        if migrate_now:
            upgraded = migrate.upgrade(cp)
            if isinstance(upgraded, Err):
                cp.dispose()
                return upgraded
        else:
            checked = check_schema(cp)
            if isinstance(checked, Err):
                cp.dispose()
                return checked
        if config.objects is not None:
            objects = open_object_stores_from(config.objects)
        else:
            objects = open_object_stores(config.resolved_objects_url)
        if isinstance(objects, Err):
            cp.dispose()
            return objects
        try:
            factory = engine_factory if engine_factory is not None else engine_for(config.ap_engine, config)
            ap = ContentStore(config.resolved_ap_dir, config.ap_shards, engine_factory=factory)
        except OSError as exc:
            cp.dispose()
            return Err(ConfigError("DATAMESH_AP_DIR", f"cannot use {config.resolved_ap_dir}: {exc}"))
        return Ok(cls(cp, ap, objects.value, config.saga_lease_s, config.inline_max_bytes, queue_lease_s))

    def close(self) -> None:
        self.ap.close()
        self.objects.close()
        self.cp.dispose()


def check_schema(cp: CpDatabase) -> Result[None, StorageError]:
    current = migrate.current_revision(cp)
    if isinstance(current, Err):
        return current
    head = migrate.head_revision(cp)
    if current.value != head:
        return Err(
            StorageError(
                "cp",
                "open",
                f"schema is at revision {current.value!r}, code expects {head!r}: run `python -m datamesh migrate`",
            )
        )
    return Ok(None)


def engine_for(name: str, config: DataMeshConfig | None = None) -> EngineFactory:
    """The AP shard engine named by ``DATAMESH_AP_ENGINE``; LSM shards take their log's fsync
    policy from ``config`` (``DATAMESH_AP_LSM_FSYNC``, ``DATAMESH_AP_LSM_FSYNC_INTERVAL_S``)."""
    if name == "lsm":
        from datamesh.storage.ap.lsm import FsyncPolicy, lsm_engine_with

        settings = config if config is not None else DataMeshConfig()
        return lsm_engine_with(FsyncPolicy(settings.ap_lsm_fsync), settings.ap_lsm_fsync_interval_s)
    return default_engine


def reader_engine_for(config: DataMeshConfig) -> EngineFactory:
    """How a process that does not own the AP shards (the Celery workers do) reads them, by
    ``DATAMESH_AP_READS``: ``files`` opens the shard files read-only (:func:`readonly_engine_for`:
    the process must run where the owners' files are); ``workers`` asks each shard's owner over the
    broker (``datamesh.workers.remote_reads``: from any host, and an LSM owner's unflushed writes
    included)."""
    if config.ap_reads == "workers":
        from datamesh.workers.remote_reads import owner_reads_engine

        return owner_reads_engine(config)
    return readonly_engine_for(config.ap_engine)


def reader_indexes_for(config: DataMeshConfig) -> IndexReader:
    """How a process that does not write the regional indexes (the index workers do) searches them,
    by ``DATAMESH_INDEX_READS``: ``files`` opens the index files read-only (the process must run
    where they are); ``workers`` asks each region's search workers over the broker
    (``datamesh.workers.remote_search``: from any host)."""
    if config.index_reads == "workers":
        from datamesh.workers.remote_search import RemoteIndexes

        return RemoteIndexes(config)
    return RegionalIndexes(config.resolved_index_dir, readonly=True)


#: How much longer than the owner's flush interval a reader waits for a committed key to show up.
VISIBILITY_MARGIN_S = 1.0


def readonly_engine_for(name: str) -> EngineFactory:
    """Readers of the AP shards another process writes (the Celery workers own them), for the engine
    named by ``DATAMESH_AP_ENGINE``.

    SQLite shards show every acknowledged write at once.  LSM shards show a write once its owner
    flushes the memtable holding it, at least every ``DEFAULT_FLUSH_INTERVAL_S``: a lookup of keys
    not found yet waits that long (plus :data:`VISIBILITY_MARGIN_S`) for them, so a turn read right
    after its saga committed is found (by the API, or by an index drain that came before the
    owner's flush).  Counts and scans show what is flushed.
    """
    if name != "lsm":
        return readonly_engine
    from datamesh.storage.ap.lsm import DEFAULT_FLUSH_INTERVAL_S, LsmShard

    wait_s = DEFAULT_FLUSH_INTERVAL_S + VISIBILITY_MARGIN_S

    def factory(path: Path) -> ShardEngine:
        directory = path.with_suffix(".lsm")

        def recover() -> bool:
            """Replay the log of a dead owner, as its next owner would, if no process writes the shard."""
            if not directory.exists():
                return False
            try:
                LsmShard(directory, background=False).close()  # recovery replays and flushes the log
            except ShardError:  # a live writer holds it: its flush interval covers what it has
                return False
            return True

        return VisibleAfterFlush(LsmShard(directory, readonly=True), wait_s, recover=recover)

    return factory
