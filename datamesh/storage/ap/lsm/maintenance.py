"""Background work of an LSM shard: the flusher thread and the compactor threads.

A mixin of :class:`~datamesh.storage.ap.lsm.shard.LsmShard`, kept apart because it is the part
that runs beside the writers: it takes the shard lock only to pick work and to install its result
(new runs in the manifest, retired runs released), never while it sorts, merges or writes files.
Failures are kept and re-raised to writers as ``ShardError``; a stalled writer is woken for it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

from datamesh.storage.ap.lsm.columns import Columns, Scratch
from datamesh.storage.ap.lsm.compaction import merge_blocks, merge_columns, pick_compaction
from datamesh.storage.ap.lsm.log import FsyncPolicy, LogWriter
from datamesh.storage.ap.lsm.manifest import Manifest, RunMeta, run_meta, save_manifest
from datamesh.storage.ap.lsm.memtable import Memtable
from datamesh.storage.ap.lsm.recovery import remove_obsolete_logs
from datamesh.storage.ap.lsm.run import Block, Run, iter_blocks, iter_columns, write_run


class ShardMaintenance:
    """Flush and compaction loops over the state an ``LsmShard`` owns (declared here for typing)."""

    path: Path
    _lock: threading.Lock
    _cond: threading.Condition
    _closing: bool
    _mem: Memtable
    _immutables: list[Memtable]
    _runs: list[tuple[RunMeta, Run]]
    _manifest: Manifest
    _busy_levels: set[int]
    _background_error: BaseException | None
    _flush_interval: float
    _block_entries: int | None
    _fanout: int
    _scratches: list[Scratch]
    _log: LogWriter
    _fsync: FsyncPolicy
    _fsync_interval: float

    def _freeze_locked(self, *, stall: bool) -> None:
        raise NotImplementedError

    def _alloc_file(self) -> int:
        raise NotImplementedError

    def _run_path(self, number: int) -> Path:
        raise NotImplementedError

    # -- background work ------------------------------------------------------------------------

    @property
    def kept_buffer_bytes(self) -> int:
        """Memory the background threads keep for their next flush or merge (none once idle)."""
        return sum(scratch.held_bytes for scratch in self._scratches)

    def _kept_scratch(self) -> Scratch:
        scratch = Scratch()
        with self._lock:
            self._scratches.append(scratch)
        return scratch

    def _flush_loop(self) -> None:
        scratch = self._kept_scratch()  # kept across flushes: see _flush_oldest
        try:
            while True:
                unsynced: LogWriter | None = None
                with self._lock:
                    idle_from = time.monotonic()
                    while not self._immutables and not self._closing:
                        aged = time.monotonic() - self._mem.created >= self._flush_interval
                        if len(self._mem) and aged:
                            self._freeze_locked(stall=False)
                            break
                        if self._log.sync_due():  # fsync policy INTERVAL, and the writers went quiet
                            unsynced = self._log
                            break
                        self._cond.wait(self._idle_wait_s())
                        _release_if_idle(scratch, idle_from)
                    if self._closing and not self._immutables:
                        return
                if unsynced is not None:
                    unsynced.sync_all()  # outside the shard lock: writers go on meanwhile
                    continue
                self._flush_oldest(scratch)
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised to writers as ShardError
            self._fail(exc)

    def _idle_wait_s(self) -> float:
        """How long the idle flusher sleeps between looks: a quarter of the flush interval, or the
        fsync interval under ``FsyncPolicy.INTERVAL`` if that is shorter."""
        if self._fsync is FsyncPolicy.INTERVAL:
            return min(self._flush_interval / 4, self._fsync_interval)
        return self._flush_interval / 4

    def _flush_oldest(self, scratch: Scratch | None = None) -> None:
        """Write the oldest frozen memtable into a tier-0 run.

        ``scratch``: the flusher thread's buffers, kept from one flush to the next (the batches'
        concatenation, ~a memtable's size, the gathered chunks and the encoded blocks): a fresh
        array that large is faulted in and zeroed page by page by the kernel on every flush
        (~3% of the CPU of a loaded shard, measured), a kept one is not.
        """
        with self._lock:
            if not self._immutables:
                return
            memtable = self._immutables[-1]
            number = self._alloc_file()
        path = self._run_path(number)
        scratch = scratch or Scratch()
        summary = write_run(
            path, memtable.flush_chunks(scratch=scratch), block_entries=self._block_entries, scratch=scratch
        )
        added = (
            [] if summary is None else [(run_meta(path.name, 0, memtable.max_seq, summary), Run(path, summary.index))]
        )
        with self._lock:
            self._immutables.remove(memtable)
            self._install_locked(added=added, removed=[])
            counters = self._manifest.counters
            counters.flush_bytes += summary.file_bytes if summary else 0
            counters.flushes += 1
            oldest = self._immutables[-1] if self._immutables else self._mem
            self._manifest.min_log = oldest.log_number
            self._manifest.last_seq = max(self._manifest.last_seq, memtable.max_seq)
            save_manifest(self.path, self._manifest)
            self._cond.notify_all()
        remove_obsolete_logs(self.path, self._manifest.min_log)

    def _compact_loop(self, min_level: int, max_level: int | None) -> None:
        scratch = self._kept_scratch()  # this thread's merge buffers, kept from one merge to the next
        try:
            while True:
                with self._lock:
                    idle_from = time.monotonic()
                    while not self._closing and self._pick(min_level, max_level) is None:
                        self._cond.wait(1.0)
                        _release_if_idle(scratch, idle_from)
                    if self._closing:
                        return
                self._compact_once(min_level, max_level, scratch)
        except BaseException as exc:  # noqa: BLE001 - kept and re-raised to writers as ShardError
            self._fail(exc)

    def _pick(self, min_level: int = 0, max_level: int | None = None) -> tuple[int, list[RunMeta]] | None:
        return pick_compaction(
            self._manifest.runs, self._fanout, min_level=min_level, max_level=max_level, busy=self._busy_levels
        )

    def _compact_once(self, min_level: int = 0, max_level: int | None = None, scratch: Scratch | None = None) -> bool:
        """Merge one due tier into a run of the next; False if nothing was due (or closing)."""
        with self._lock:
            picked = self._pick(min_level, max_level)
            if picked is None or self._closing:
                return False
            level, inputs = picked
            names = {meta.name for meta in inputs}
            pairs = [pair for pair in self._runs if pair[0].name in names]
            drop_tombstones = all(meta.level <= level for meta in self._manifest.runs)
            number = self._alloc_file()
            self._busy_levels.add(level)
        try:
            return self._merge(level, pairs, number, drop_tombstones=drop_tombstones, scratch=scratch or Scratch())
        finally:
            with self._lock:
                self._busy_levels.discard(level)
                self._cond.notify_all()

    def _merge(
        self, level: int, pairs: list[tuple[RunMeta, Run]], number: int, *, drop_tombstones: bool, scratch: Scratch
    ) -> bool:
        path = self._run_path(number)
        widths = {run.key_width for _, run in pairs}
        merged: Iterator[Block] | Iterator[Columns]
        if len(widths) == 1 and 0 not in widths:  # one key width: the vectorised merge
            width = widths.pop()
            # The inputs' pages are dropped as they are read: the output reuses them (see iter_columns).
            columns = [iter_columns(run.path, width, drop_cache=True) for _, run in pairs]
            merged = merge_columns(columns, drop_tombstones=drop_tombstones, scratch=scratch)
        else:
            streams = [iter_blocks(run.path) for _, run in pairs]
            merged = merge_blocks(streams, drop_tombstones=drop_tombstones)
        summary = write_run(
            path,
            merged,
            block_entries=self._block_entries,
            cancelled=lambda: self._closing,
            scratch=scratch,
        )
        if summary is None and self._closing:
            return False
        added: list[tuple[RunMeta, Run]] = []
        if summary is not None:
            max_seq = max(meta.max_seq for meta, _ in pairs)
            added.append((run_meta(path.name, level + 1, max_seq, summary), Run(path, summary.index)))
        with self._lock:
            self._install_locked(added=added, removed=pairs)
            self._cond.notify_all()  # writers stalled on tier-0 debt
            counters = self._manifest.counters
            counters.compaction_bytes_read += sum(meta.file_bytes for meta, _ in pairs)
            counters.compaction_bytes_written += summary.file_bytes if summary else 0
            counters.compactions += 1
            save_manifest(self.path, self._manifest)
        for _, run in pairs:
            run.retire(delete=True)
        return True

    def _install_locked(self, *, added: list[tuple[RunMeta, Run]], removed: list[tuple[RunMeta, Run]]) -> None:
        gone = {meta.name for meta, _ in removed}
        runs = [pair for pair in self._runs if pair[0].name not in gone] + added
        self._runs = sorted(runs, key=lambda pair: pair[0].max_seq, reverse=True)  # one atomic swap
        self._manifest.runs = [meta for meta, _ in self._runs]

    def _fail(self, exc: BaseException) -> None:
        with self._lock:
            self._background_error = exc
            self._cond.notify_all()


#: A background thread idle this long lets its kept buffers go.  Under a steady load a flush or
#: merge follows the last within a few seconds and finds them still there; an idle shard holds none.
IDLE_RELEASE_S = 10.0


def _release_if_idle(scratch: Scratch, idle_from: float) -> None:
    if time.monotonic() - idle_from >= IDLE_RELEASE_S:
        scratch.release()
