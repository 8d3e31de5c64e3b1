"""The AP tier's LSM engine: log + memtable in front of sorted SQLite runs, size-tiered compaction.

Modules, in the order data flows: :mod:`.format` (batch layout), :mod:`.log` (write-ahead log),
:mod:`.memtable`, :mod:`.run` (sorted runs as SQLite files) with :mod:`.filter` (key filters),
:mod:`.compaction`, :mod:`.manifest`, :mod:`.recovery`, :mod:`.shard` (``LsmShard``) with its
background work in :mod:`.maintenance`, :mod:`.reader` (readers in other processes) and
:mod:`.stats` (``format_stats`` for ``python -m datamesh ap stats``).
"""

from datamesh.storage.ap.lsm.log import FsyncPolicy
from datamesh.storage.ap.lsm.shard import (
    DEFAULT_BLOCK_ENTRIES,
    DEFAULT_FLUSH_INTERVAL_S,
    DEFAULT_FSYNC,
    DEFAULT_FSYNC_INTERVAL_S,
    DEFAULT_MAX_IMMUTABLE,
    DEFAULT_MAX_TIER0_RUNS,
    DEFAULT_MEMTABLE_BYTES,
    DEFAULT_TIER_FANOUT,
    LsmShard,
    lsm_engine,
    lsm_engine_with,
)
from datamesh.storage.ap.lsm.stats import LsmStats, format_stats, read_stats

__all__ = [
    "DEFAULT_BLOCK_ENTRIES",
    "DEFAULT_FLUSH_INTERVAL_S",
    "DEFAULT_FSYNC",
    "DEFAULT_FSYNC_INTERVAL_S",
    "DEFAULT_MAX_IMMUTABLE",
    "DEFAULT_MAX_TIER0_RUNS",
    "DEFAULT_MEMTABLE_BYTES",
    "DEFAULT_TIER_FANOUT",
    "FsyncPolicy",
    "LsmShard",
    "LsmStats",
    "format_stats",
    "lsm_engine",
    "lsm_engine_with",
    "read_stats",
]
