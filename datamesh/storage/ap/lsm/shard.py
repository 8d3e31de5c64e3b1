"""``LsmShard``: a shard engine with a log and memtable in front of sorted SQLite runs.

Write path: ``put_many`` encodes the batch once, appends it to the log as one checksummed record
and applies it to the memtable, both under the shard lock (so log order is apply order and a batch
is visible whole or not at all), then makes the record durable outside the lock (group commit, see
:mod:`~datamesh.storage.ap.lsm.log`).  A full memtable is frozen and a new log started; a
background *flusher* thread writes frozen memtables into tier-0 runs, and two background
*compactor* threads merge runs (:mod:`~datamesh.storage.ap.lsm.compaction`): one only merges tier 0,
so tier-0 debt always drains, the other merges the bigger tiers.  From ``slowdown_tier0_runs``
tier-0 runs each write sleeps a few milliseconds (handing the compactors CPU and the GIL); writers
stall outright only when ``max_immutable`` frozen memtables wait for the flusher or
``max_tier0_runs`` runs wait in tier 0.  A stall lasts about one memtable flush or one tier-0
merge of ``fanout`` runs (merges are bounded to ``fanout`` runs; a big-tier merge never blocks
writers); both are counted in :meth:`LsmShard.stats` (``stalls``, ``stall_seconds_max``,
``slowdown_seconds_total``).

Read path: memtable, frozen memtables, then runs newest first (each skipped by key range and key
filter).  A read pins the runs it needs (reference counts), so a compaction that replaces them
meanwhile deletes the files only after the read: scans see one consistent snapshot.

Readers in other processes open the shard with ``readonly=True``: they read flushed runs directly
(``immutable=1`` SQLite handles, no lock) and reload the manifest when its generation changes.
They do not see the writer's memtable: the writer flushes a non-empty memtable at least every
``flush_interval_s``, which bounds how stale such a reader is (the owner sees its writes at once).
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

from datamesh.storage.ap.base import ShardEngine, ShardError
from datamesh.storage.ap.lsm.columns import Scratch
from datamesh.storage.ap.lsm.compaction import merge_blocks, pick_compaction
from datamesh.storage.ap.lsm.format import FormatError, Value, entry_parts, split_puts
from datamesh.storage.ap.lsm.log import HEADER, FsyncPolicy, LogWriter
from datamesh.storage.ap.lsm.maintenance import ShardMaintenance
from datamesh.storage.ap.lsm.manifest import Manifest, RunMeta
from datamesh.storage.ap.lsm.memtable import MISSING, Memtable
from datamesh.storage.ap.lsm.reader import reload_runs
from datamesh.storage.ap.lsm.recovery import file_path, recover
from datamesh.storage.ap.lsm.run import Block, Run
from datamesh.storage.ap.lsm.stats import LOG_SUFFIX, RUN_SUFFIX, LsmStats, build_stats, logs_bytes
from datamesh.storage.ap.sqlite_shard import prefix_upper_bound, take_writer_lock

DEFAULT_MEMTABLE_BYTES = 128 * 1024 * 1024
"""Key+value bytes buffered before a flush: bigger means fewer, larger runs and less compaction
(see :mod:`.compaction` for the measurements behind 128 MiB and the fanout)."""
DEFAULT_MAX_IMMUTABLE = 2
"""Frozen memtables allowed to wait for the flusher before writers stall."""
DEFAULT_BLOCK_ENTRIES: int | None = None
"""Entries packed per SQLite row of a run (a point lookup decodes one block); ``None`` sizes each
run's blocks to fill its pages (:func:`.run.fit_block_entries`: 72 entries of 16+200 bytes)."""
DEFAULT_TIER_FANOUT = 8
"""Runs of one tier merged together into one run of the next (see :mod:`.compaction` for the choice)."""
SLOWDOWN_TIER0_FACTOR = 2
DEFAULT_SLOWDOWN_TIER0_RUNS = SLOWDOWN_TIER0_FACTOR * DEFAULT_TIER_FANOUT
"""From this many tier-0 runs (``SLOWDOWN_TIER0_FACTOR`` x the fanout, whatever fanout a shard is
given) each write sleeps a little (``SLOWDOWN_STEP_S`` per extra run), which hands the compactors
CPU (and the GIL) before the hard stall below is needed."""
SLOWDOWN_STEP_S = 0.01
MAX_TIER0_FACTOR = 3
DEFAULT_MAX_TIER0_RUNS = MAX_TIER0_FACTOR * DEFAULT_TIER_FANOUT
"""Writers stall while tier 0 holds this many runs (``MAX_TIER0_FACTOR`` x the fanout): compaction
debt may not grow without bound."""
DEFAULT_FSYNC = FsyncPolicy.ALWAYS
DEFAULT_FSYNC_INTERVAL_S = 0.05
DEFAULT_FLUSH_INTERVAL_S = 2.0
"""A non-empty memtable older than this is flushed, bounding staleness for other processes."""


class LsmShard(ShardMaintenance, ShardEngine):
    """One shard directory (``<path>/``): ``MANIFEST``, ``NNNNNNNN.log`` files and ``NNNNNNNN.sqlite3`` runs."""

    def __init__(
        self,
        path: Path,
        *,
        readonly: bool = False,
        memtable_bytes: int = DEFAULT_MEMTABLE_BYTES,
        max_immutable: int = DEFAULT_MAX_IMMUTABLE,
        block_entries: int | None = DEFAULT_BLOCK_ENTRIES,
        tier_fanout: int = DEFAULT_TIER_FANOUT,
        slowdown_tier0_runs: int | None = None,
        max_tier0_runs: int | None = None,
        fsync: FsyncPolicy = DEFAULT_FSYNC,
        fsync_interval_s: float = DEFAULT_FSYNC_INTERVAL_S,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        background: bool = True,
    ) -> None:
        if memtable_bytes < 1 or max_immutable < 1 or (block_entries or 1) < 1 or tier_fanout < 2:
            raise ValueError("memtable_bytes, max_immutable, block_entries >= 1 and tier_fanout >= 2 required")
        self.path = Path(path)
        self.readonly = readonly
        self._memtable_limit = memtable_bytes
        self._max_immutable = max_immutable
        self._block_entries = block_entries
        self._fanout = tier_fanout
        if max_tier0_runs is None:
            max_tier0_runs = MAX_TIER0_FACTOR * tier_fanout
        if slowdown_tier0_runs is None:
            slowdown_tier0_runs = SLOWDOWN_TIER0_FACTOR * tier_fanout
        self._max_tier0_runs = max(max_tier0_runs, tier_fanout)
        self._slowdown_tier0_runs = max(slowdown_tier0_runs, tier_fanout)
        self._slowdown_total = 0.0
        self._fsync = fsync
        self._fsync_interval = fsync_interval_s
        self._flush_interval = flush_interval_s
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._closing = False
        self._background_error: BaseException | None = None
        self._busy_levels: set[int] = set()
        self._stalls = 0
        self._stall_total = 0.0
        self._stall_max = 0.0
        self._lock_fd: int | None = None
        self._runs: list[tuple[RunMeta, Run]] = []  # newest first
        self._immutables: list[Memtable] = []  # newest first
        self._threads: list[threading.Thread] = []
        self._scratches: list[Scratch] = []  # the background threads' kept buffers
        self._manifest_stat: tuple[int, int] = (0, 0)
        if readonly:
            self._manifest = Manifest()
            self._mem = Memtable(0)
            self._refresh_readonly()
            self.last_recovery: dict[str, int | str] = {}
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock_fd = take_writer_lock(self.path)
        try:
            state = recover(self.path, block_entries=block_entries)
        except BaseException:
            self._release_writer_lock()
            raise
        self._manifest = state.manifest
        self._runs = [(meta, Run(file_path(self.path, meta.name))) for meta in state.manifest.runs]
        self._runs.sort(key=lambda pair: pair[0].max_seq, reverse=True)
        self._seq = state.manifest.last_seq
        self.last_recovery = state.report
        self._mem = Memtable(state.log_number)
        self._log = LogWriter(self._log_path(state.log_number), policy=fsync, fsync_interval_s=fsync_interval_s)
        if background:
            # One compactor keeps tier 0 moving (it bounds the stall), the other takes bigger tiers.
            workers = (
                (self._flush_loop, (), "flusher"),
                (self._compact_loop, (0, 0), "compactor-0"),
                (self._compact_loop, (1, None), "compactor-1"),
            )
            for target, arguments, name in workers:
                thread = threading.Thread(
                    target=target, args=arguments, name=f"lsm-{name}-{self.path.name}", daemon=True
                )
                thread.start()
                self._threads.append(thread)

    # -- writes ---------------------------------------------------------------------------------

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        if not items:
            return
        parts, keys, values = split_puts(items)
        self._write(parts, keys, values)

    def delete_many(self, keys: Sequence[bytes]) -> int:
        if not keys:
            return 0
        existed = len(self.get_many(keys))
        unique = list(dict.fromkeys(keys))
        tombstones: list[Value] = [None] * len(unique)
        self._write(entry_parts(unique, tombstones), unique, tombstones)
        return existed

    def _write(self, parts: list[bytes], keys: list[bytes], values: Sequence[Value]) -> None:
        self._require_writer()
        excess = self._tier0_runs() - self._slowdown_tier0_runs + 1
        if excess > 0 and self._threads:
            delay = min(excess * SLOWDOWN_STEP_S, 0.1)
            time.sleep(delay)
            self._slowdown_total += delay
        with self._lock:
            self._check_usable()
            if self._mem.approx_bytes >= self._memtable_limit:
                self._freeze_locked(stall=True)
            self._seq += 1
            sequence = self._seq
            log = self._log
            log.append(sequence, parts)
            self._mem.apply_parts(parts, keys, values, sequence)
            size = sum(map(len, parts))
            counters = self._manifest.counters
            counters.user_bytes += size
            counters.log_bytes += size + HEADER.size
        log.sync(sequence)
        if not self._threads:
            self._drain_inline()

    def _drain_inline(self) -> None:
        """Without background threads (tests, tools): flush frozen memtables in the caller."""
        while self._immutables:
            self._flush_oldest()

    def _freeze_locked(self, *, stall: bool) -> None:
        """Make the memtable immutable and start a new log; stall while too many wait for the flusher."""
        if stall and self._threads:
            started = time.monotonic()
            stalled = False
            while self._must_stall() and self._background_error is None:
                stalled = True
                self._cond.wait(1.0)
            if stalled:
                waited = time.monotonic() - started
                self._stalls += 1
                self._stall_total += waited
                self._stall_max = max(self._stall_max, waited)
            self._check_usable()
        number = self._alloc_file()
        old_log = self._log
        self._log = LogWriter(self._log_path(number), policy=self._fsync, fsync_interval_s=self._fsync_interval)
        old_log.close()
        self._immutables.insert(0, self._mem)
        self._mem = Memtable(number)
        self._cond.notify_all()

    def _must_stall(self) -> bool:
        """Too many frozen memtables wait for the flusher, or too many tier-0 runs for compaction
        (counting the frozen memtables, each a tier-0 run once flushed, so tier 0 stays within
        ``max_tier0_runs``)."""
        if len(self._immutables) >= self._max_immutable:
            return True
        return self._tier0_runs() + len(self._immutables) >= self._max_tier0_runs

    def _tier0_runs(self) -> int:
        return sum(1 for meta, _ in self._runs if meta.level == 0)

    def flush(self) -> None:
        """Freeze the memtable and wait until every frozen memtable is a run (readers then see it)."""
        self._require_writer()
        with self._lock:
            self._check_usable()
            if len(self._mem):
                self._freeze_locked(stall=False)
            while self._immutables and self._threads:
                self._check_usable()
                self._cond.wait(1.0)
        if not self._threads:
            self._drain_inline()
        self._check_usable()

    def wait_for_compactions(self, timeout: float | None = None) -> bool:
        """Block until no merge is due or running; False on timeout.  Without threads, compact inline."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._threads:
            while self._compact_once():
                pass
            return True
        with self._lock:
            while self._busy_levels or pick_compaction(self._manifest.runs, self._fanout) is not None:
                self._check_usable()
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(1.0 if remaining is None else min(remaining, 1.0))
        return True

    # -- reads ----------------------------------------------------------------------------------

    def _snapshot(self) -> tuple[list[Memtable], list[Run]]:
        """Memtables newest first and pinned runs newest first; call under the lock."""
        runs = [run for _, run in self._runs]
        for run in runs:
            run.acquire()
        return [self._mem, *self._immutables], runs

    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        self._refresh_readonly()
        found: dict[bytes, bytes] = {}
        pending: list[bytes] = list(keys)
        with self._lock:
            self._check_open()
            memtables, runs = self._snapshot()
            for memtable in memtables:
                if not pending:
                    break
                pending = _settle(pending, memtable.get_many(pending), found)
        try:
            for run in runs:  # newest first: a key found (or deleted) in a newer run is settled there
                if not pending:
                    break
                pending = _settle(pending, run.get_many(pending), found)
        except FormatError as exc:
            raise ShardError(f"corrupt run in {self.path}: {exc}") from exc
        finally:
            for run in runs:
                run.release()
        return found

    def scan_prefix(self, prefix: bytes, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        self._refresh_readonly()
        upper = prefix_upper_bound(prefix)
        merged: dict[bytes, Value] = {}
        with self._lock:
            self._check_open()
            memtables, runs = self._snapshot()
            for memtable in memtables:
                for key, value in memtable.range_items(prefix, upper):
                    merged.setdefault(key, value)
        try:
            for run in runs:
                for key, value in run.range_items(prefix, upper):
                    merged.setdefault(key, value)
        except FormatError as exc:
            raise ShardError(f"corrupt run in {self.path}: {exc}") from exc
        finally:
            for run in runs:
                run.release()
        live = [(key, value) for key, value in sorted(merged.items()) if value is not None]
        return iter(live if limit is None else live[:limit])

    def iter_all(self) -> Iterator[Block]:
        """Every live entry in key order, in chunks, from a snapshot (streams; for counts and dumps)."""
        self._refresh_readonly()
        with self._lock:
            self._check_open()
            memtables, runs = self._snapshot()
            streams: list[Iterator[Block]] = []
            for memtable in memtables:
                items = memtable.range_items(b"", None)
                streams.append(iter([([k for k, _ in items], [v for _, v in items])]) if items else iter(()))
        try:
            streams.extend(run.blocks() for run in runs)  # through the pinned handles, not by name
            yield from merge_blocks(streams, drop_tombstones=True)
        finally:
            for run in runs:
                run.release()

    def count(self) -> int:
        """Live keys, by a streaming merge of every source (linear in the shard's size)."""
        try:
            return sum(len(keys) for keys, _ in self.iter_all())
        except FormatError as exc:
            raise ShardError(f"corrupt run in {self.path}: {exc}") from exc

    # -- lifecycle and introspection ------------------------------------------------------------

    def stats(self) -> LsmStats:
        self._refresh_readonly()
        with self._lock:
            memtables = [self._mem, *self._immutables]
            log_bytes = logs_bytes(self.path)
            return build_stats(
                self.path,
                self._manifest,
                fanout=self._fanout,
                memtable_bytes=sum(m.approx_bytes for m in memtables),
                memtable_entries=sum(len(m) for m in memtables),
                immutable_memtables=len(self._immutables),
                log_bytes=log_bytes,
                compacting=bool(self._busy_levels),
                stalls=self._stalls,
                stall_seconds_total=self._stall_total,
                stall_seconds_max=self._stall_max,
                slowdown_seconds_total=self._slowdown_total,
                last_recovery=self.last_recovery,
            )

    def close(self) -> None:
        """Stop background work, flush the memtable into a run (so readers see it), release the lock."""
        with self._lock:
            if self._closed:
                return
            self._closing = True
            self._cond.notify_all()
        for thread in self._threads:
            thread.join()
        self._threads = []
        try:
            if not self.readonly and self._background_error is None:
                with self._lock:
                    if len(self._mem):
                        self._freeze_locked(stall=False)
                self._drain_inline()
        finally:
            with self._lock:
                self._closed = True
                if not self.readonly:
                    self._log.close()
                for _, run in self._runs:
                    run.release()
                self._runs = []
            self._release_writer_lock()

    def _refresh_readonly(self) -> None:
        """In a reader: reopen the runs named by a changed manifest (see :func:`.reader.reload_runs`)."""
        if not self.readonly:
            return
        current = {meta.name: run for meta, run in self._runs}
        reloaded = reload_runs(self.path, current, self._manifest_stat)
        if reloaded is None:
            return
        manifest, opened, stamp = reloaded
        with self._lock:
            kept = {meta.name for meta, _ in opened}
            for name, run in current.items():
                if name not in kept:
                    run.retire(delete=False)
            self._runs = sorted(opened, key=lambda pair: pair[0].max_seq, reverse=True)
            self._manifest = manifest
            self._manifest_stat = stamp

    def _alloc_file(self) -> int:
        number = self._manifest.next_file
        self._manifest.next_file += 1
        return number

    def _log_path(self, number: int) -> Path:
        return self.path / f"{number:08d}{LOG_SUFFIX}"

    def _run_path(self, number: int) -> Path:
        return self.path / f"{number:08d}{RUN_SUFFIX}"

    def _require_writer(self) -> None:
        if self.readonly:
            raise ShardError(f"shard {self.path} is open read-only")

    def _check_open(self) -> None:
        if self._closed:
            raise ShardError(f"shard {self.path} is closed")

    def _check_usable(self) -> None:
        self._check_open()
        if self._background_error is not None:
            raise ShardError(f"shard {self.path} background work failed: {self._background_error!r}")

    def _release_writer_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None


def lsm_engine_with(fsync: FsyncPolicy, fsync_interval_s: float) -> Callable[[Path], ShardEngine]:
    """An ``EngineFactory`` for :class:`~datamesh.storage.ap.store.ContentStore` (``<path>.lsm/``)
    whose shards sync their logs by ``fsync`` and ``fsync_interval_s``."""

    def factory(path: Path) -> ShardEngine:
        return LsmShard(path.with_suffix(".lsm"), fsync=fsync, fsync_interval_s=fsync_interval_s)

    return factory


#: :func:`lsm_engine_with` the default fsync policy.
lsm_engine = lsm_engine_with(DEFAULT_FSYNC, DEFAULT_FSYNC_INTERVAL_S)


def _settle(keys: Sequence[bytes], values: Sequence[object], found: dict[bytes, bytes]) -> list[bytes]:
    """Record in ``found`` the keys one layer (a memtable, a run) has a value for; the keys it lacks,
    to ask the next (older) layer.  A tombstone settles its key as absent."""
    missing: list[bytes] = []
    for key, value in zip(keys, values, strict=True):
        if value is MISSING:
            missing.append(key)
        elif isinstance(value, bytes):
            found[key] = value
    return missing
