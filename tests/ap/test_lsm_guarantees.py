"""What the LSM shard promises beyond reading back what it was given: writers stall only at the
tier-0 run limit and for no longer than a tier-0 merge, lookups skip runs by key range and key
filter, and published runs are SQLite files in WAL mode holding their blocks in key order.

Background threads are held or observed with events (never with sleeps); a ``join(timeout=...)``
or ``wait(timeout=...)`` is only a guard against a hang."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datamesh.storage.ap.lsm import LsmShard
from datamesh.storage.ap.lsm.filter import KeyFilter
from datamesh.storage.ap.lsm.maintenance import ShardMaintenance
from datamesh.storage.ap.lsm.manifest import load_manifest
from datamesh.storage.ap.lsm.run import iter_blocks, verify_run

HANG_GUARD_S = 30.0

# -- stalls ---------------------------------------------------------------------------------------


class _Writer:
    """One ``put_many`` in a thread of its own, keeping what it raised."""

    def __init__(self, shard: LsmShard, items: list[tuple[bytes, bytes]]) -> None:
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(shard, items), daemon=True)
        self.thread.start()

    def _run(self, shard: LsmShard, items: list[tuple[bytes, bytes]]) -> None:
        try:
            shard.put_many(items)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the test through finished()
            self.error = exc

    def finished(self, timeout: float = HANG_GUARD_S) -> bool:
        self.thread.join(timeout=timeout)
        if self.error is not None:
            raise self.error
        return not self.thread.is_alive()


class _HeldTier0Merges:
    """Holds every tier-0 merge at its start until released; flushes and other merges go on."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.started = threading.Event()
        self.release = threading.Event()
        merge = ShardMaintenance._merge

        def held(shard: ShardMaintenance, level: int, *args: Any, **kwargs: Any) -> bool:
            if level == 0:
                self.started.set()
                self.release.wait(timeout=HANG_GUARD_S)
            return merge(shard, level, *args, **kwargs)

        monkeypatch.setattr(ShardMaintenance, "_merge", held)


def _observe_tier0(shard: LsmShard, monkeypatch: pytest.MonkeyPatch) -> tuple[list[int], threading.Event]:
    """The number of tier-0 runs after every change of the run list, and an event set once a writer stalls."""
    counts: list[int] = []
    stalling = threading.Event()
    install = shard._install_locked
    must_stall = shard._must_stall

    def install_and_count(**changes: Any) -> None:
        install(**changes)
        counts.append(shard._tier0_runs())

    def must_stall_noted() -> bool:
        answer = must_stall()
        if answer:
            stalling.set()
        return answer

    monkeypatch.setattr(shard, "_install_locked", install_and_count)
    monkeypatch.setattr(shard, "_must_stall", must_stall_noted)
    return counts, stalling


def _batches(count: int) -> Iterator[list[tuple[bytes, bytes]]]:
    """Batches of 20 entries of 16+100 bytes: each one alone fills a 2,000-byte memtable."""
    for batch in range(count):
        yield [(b"b%03d-key-%07d" % (batch, n), b"v" * 100) for n in range(20)]


class _Flushes:
    """Counts the flusher's finished flushes (log removal included); can hold flushes when they start."""

    def __init__(self, shard: LsmShard, monkeypatch: pytest.MonkeyPatch) -> None:
        self.done = 0
        self.hold = False
        self.release = threading.Event()
        self._cond = threading.Condition()
        flush_oldest = shard._flush_oldest

        def counted(*args: Any) -> None:
            if self.hold:
                self.release.wait(timeout=HANG_GUARD_S)
            flush_oldest(*args)
            with self._cond:
                self.done += 1
                self._cond.notify_all()

        monkeypatch.setattr(shard, "_flush_oldest", counted)

    def wait_for(self, count: int) -> None:
        with self._cond:
            assert self._cond.wait_for(lambda: self.done >= count, timeout=HANG_GUARD_S)


def test_writers_stall_only_at_the_tier0_run_limit_and_resume_when_the_held_merge_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a shard with background threads whose every batch fills the memtable, fanout 2, a
    # slowdown from 3 tier-0 runs and a stall at 4, and whose tier-0 merges are held when they start
    merges = _HeldTier0Merges(monkeypatch)
    shard = LsmShard(
        tmp_path / "s",
        memtable_bytes=2000,
        tier_fanout=2,
        slowdown_tier0_runs=3,
        max_tier0_runs=4,
        flush_interval_s=3600,  # no flush by age: every run comes from a write here
    )
    tier0_counts, stalling = _observe_tier0(shard, monkeypatch)
    flushes = _Flushes(shard, monkeypatch)
    batches = list(_batches(6))
    try:
        # When batches are written one by one, each freezing the previous memtable into a tier-0 run,
        # and the merge of the first two runs starts and is held
        for number, batch in enumerate(batches[:5]):
            assert _Writer(shard, batch).finished(), f"batch {number} stalled with {shard._tier0_runs()} tier-0 runs"
            flushes.wait_for(number)
            if number == 2:
                assert merges.started.wait(timeout=HANG_GUARD_S)
        # Then no write stalled on the way to the limit (writes only slowed down from 3 runs on)
        assert shard._tier0_runs() == 4 and tier0_counts[-1] == 4
        assert not stalling.is_set() and shard.stats().stalls == 0
        assert shard.stats().slowdown_seconds_total > 0
        # When one more batch is written while tier 0 holds 4 runs and the merge is still held
        blocked = _Writer(shard, batches[5])
        # Then that write stalls (and reads still go on), and it stays stalled while the merge is held
        assert stalling.wait(timeout=HANG_GUARD_S)
        assert shard.get_many([batches[0][0][0]]) == {batches[0][0][0]: batches[0][0][1]}
        assert blocked.thread.is_alive() and shard.stats().stalls == 0
        # When the merge is let go
        merges.release.set()
        # Then the stalled write returns, and its stall is counted
        assert blocked.finished(), "the write stayed stalled after the tier-0 merge ended"
        flushes.wait_for(5)  # every flush finished, logs removed included
        stats = shard.stats()
        assert stats.stalls == 1 and stats.stall_seconds_max > 0
        # And tier 0 never held more than 4 runs
        assert shard.wait_for_compactions(timeout=HANG_GUARD_S)
        assert max(tier0_counts) == 4
        expected = dict(pair for batch in batches for pair in batch)
        assert shard.get_many(list(expected)) == expected
    finally:
        merges.release.set()
        shard.close()


def test_tier0_stays_within_the_run_limit_while_frozen_memtables_wait_for_the_flusher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a shard (max_immutable=2, fanout 2, a stall at 4 tier-0 runs) whose tier-0 merge is held
    # and whose tier 0 holds 3 runs
    merges = _HeldTier0Merges(monkeypatch)
    shard = LsmShard(
        tmp_path / "s", memtable_bytes=2000, max_immutable=2, tier_fanout=2, max_tier0_runs=4, flush_interval_s=3600
    )
    tier0_counts, stalling = _observe_tier0(shard, monkeypatch)
    flushes = _Flushes(shard, monkeypatch)
    batches = list(_batches(6))
    blocked: _Writer | None = None
    try:
        for number, batch in enumerate(batches[:4]):
            assert _Writer(shard, batch).finished()
            flushes.wait_for(number)
        assert shard._tier0_runs() == 3 and merges.started.wait(timeout=HANG_GUARD_S)
        # When the flusher is held, one more memtable is frozen (3 runs + 1 frozen: the limit),
        flushes.hold = True
        assert _Writer(shard, batches[4]).finished()
        # then the next writer stalls, although only one memtable waits for the flusher: flushed, it
        # would put tier 0 past the limit
        blocked = _Writer(shard, batches[5])
        assert stalling.wait(timeout=HANG_GUARD_S) and blocked.thread.is_alive()
        # And once the flusher goes on, tier 0 is at the limit and the writer still waits for the merge
        flushes.release.set()
        flushes.wait_for(4)
        assert shard._tier0_runs() == 4 and blocked.thread.is_alive()
        # Then the merge lets it through, and tier 0 never held more than max_tier0_runs runs
        merges.release.set()
        assert blocked.finished()
        assert max(tier0_counts) == 4 and shard.stats().stalls >= 1
        assert shard.get_many([k for k, _ in batches[5]]) == dict(batches[5])
    finally:
        flushes.release.set()
        merges.release.set()
        if blocked is not None:
            blocked.finished()
        shard.close()


def test_stats_succeed_while_the_flusher_removes_an_obsolete_log(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datamesh.storage.ap.lsm import maintenance

    # Given a shard whose flusher has flushed a memtable and is about to remove its log
    removal_waiting = threading.Event()
    removal_go = threading.Event()
    removal_done = threading.Event()
    remove_obsolete_logs = maintenance.remove_obsolete_logs

    def held_removal(directory: Path, min_log: int) -> None:
        removal_waiting.set()
        removal_go.wait(timeout=HANG_GUARD_S)
        remove_obsolete_logs(directory, min_log)
        removal_done.set()

    monkeypatch.setattr(maintenance, "remove_obsolete_logs", held_removal)
    shard = LsmShard(tmp_path / "s", memtable_bytes=2000, flush_interval_s=3600)
    try:
        batches = list(_batches(2))
        shard.put_many(batches[0])
        shard.put_many(batches[1])  # freezes the first memtable: the flusher writes it, then removes its log
        assert removal_waiting.wait(timeout=HANG_GUARD_S)
        # When stats() lists the logs just before the flusher removes the obsolete one
        test_thread = threading.get_ident()

        class ListedBeforeRemoval(type(shard.path)):  # type: ignore[misc]
            def glob(self, pattern: str) -> Iterator[Path]:  # type: ignore[override]
                listed = list(super().glob(pattern))
                if threading.get_ident() == test_thread and not removal_go.is_set():
                    removal_go.set()
                    assert removal_done.wait(timeout=HANG_GUARD_S)
                return iter(listed)

        monkeypatch.setattr(shard, "path", ListedBeforeRemoval(shard.path))
        stats = shard.stats()
        # Then they count the logs that are still there
        assert stats.log_bytes == shard._log.bytes_written
    finally:
        removal_go.set()
        shard.close()


# -- lookups skip runs ----------------------------------------------------------------------------


def _key(prefix: bytes, number: int) -> bytes:
    return prefix + b"%015d" % number  # 16 bytes


class _BlockReads:
    """Stands for a run's SQLite handle and counts the block reads of its point lookups (``Run.get``)."""

    def __init__(self, db: sqlite3.Connection, name: str, counts: Counter[str]) -> None:
        self._db = db
        self._name = name
        self._counts = counts

    def execute(self, sql: str, parameters: Any = ()) -> sqlite3.Cursor:
        if sql.startswith("SELECT data, checksum FROM blocks WHERE id = ?"):
            self._counts[self._name] += 1
        return self._db.execute(sql, parameters)

    def close(self) -> None:
        self._db.close()


def _shard_of_four_runs(path: Path) -> tuple[LsmShard, dict[bytes, bytes]]:
    """Runs, oldest first: a0..a3998, b0..b3998, c0..c3998 (even numbers), and over a3000..b998
    every fourth number (so a3002 lies in the newest run's range without being in it)."""
    shard = LsmShard(path, background=False)
    expected: dict[bytes, bytes] = {}
    runs = [
        [_key(b"a", n) for n in range(0, 4000, 2)],
        [_key(b"b", n) for n in range(0, 4000, 2)],
        [_key(b"c", n) for n in range(0, 4000, 2)],
        [_key(b"a", n) for n in range(3000, 4000, 4)] + [_key(b"b", n) for n in range(0, 1000, 4)],
    ]
    for age, keys in enumerate(runs):
        items = [(key, b"%d-%s" % (age, key)) for key in keys]
        shard.put_many(items)
        shard.flush()
        expected.update(items)
    assert shard.stats().runs_per_level == {0: 4}
    return shard, expected


def _count_block_reads(shard: LsmShard) -> tuple[Counter[str], dict[str, tuple[bytes, bytes]]]:
    """Per run file, the block reads of point lookups from now on; and each run's key range."""
    counts: Counter[str] = Counter()
    ranges: dict[str, tuple[bytes, bytes]] = {}
    for meta, run in shard._runs:
        run._db = _BlockReads(run._db, meta.name, counts)  # type: ignore[assignment]
        ranges[meta.name] = (run.min_key, run.max_key)
    return counts, ranges


def test_a_lookup_never_reads_a_run_whose_key_range_does_not_hold_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a shard of four runs of disjoint and overlapping key ranges, block reads counted per run,
    # and key filters that answer "maybe" to every key (so only the key range can skip a run)
    shard, expected = _shard_of_four_runs(tmp_path / "s")
    counts, ranges = _count_block_reads(shard)
    monkeypatch.setattr(KeyFilter, "may_contain", lambda self, key, ordinal: True)
    present = [_key(b"a", 100), _key(b"a", 3002), _key(b"a", 3004), _key(b"b", 500), _key(b"b", 2000), _key(b"c", 10)]
    absent = [_key(b"a", 9999), _key(b"b", 9999), _key(b"c", 9999), _key(b"d", 0), _key(b" ", 0)]
    for key in present + absent:
        counts.clear()
        # When the key is looked up
        found = shard.get_many([key])
        # Then no run whose range misses the key did a block read (a present key was read from a run)
        assert found == ({key: expected[key]} if key in expected else {})
        outside = [name for name, (low, high) in ranges.items() if not low <= key <= high]
        assert all(counts[name] == 0 for name in outside), (key, counts, outside)
        assert sum(counts.values()) >= (key in expected), (key, counts)
    shard.close()


def test_lookups_of_keys_a_run_lacks_inside_its_key_range_are_answered_by_its_key_filter(tmp_path: Path) -> None:
    # Given the same four runs, block reads counted per run
    shard, expected = _shard_of_four_runs(tmp_path / "s")
    counts, ranges = _count_block_reads(shard)
    # When 1,000 absent keys that lie inside some run's key range are looked up (odd numbers)
    absent = [_key(prefix, n) for prefix in (b"a", b"b", b"c") for n in range(1, 4000, 2)][::6]
    assert len(absent) == 1000
    assert all(any(low <= key <= high for low, high in ranges.values()) for key in absent)
    found = shard.get_many(absent)
    # Then none is found, and hardly any caused a block read: the filters' false-positive rate is
    # about partition / 2**32 (~1e-6 here, see filter.py); 1% is a bound far above it and far below
    # the one read per probed run that a missing filter check costs
    assert found == {}
    assert sum(counts.values()) <= 10, counts
    # And keys in the newest run's range but only in an older run read only the older runs' blocks,
    # each block once for the whole batch (500 keys, a few blocks), not once per key
    counts.clear()
    shadowed = [_key(b"a", n) for n in range(3002, 4000, 4)] + [_key(b"b", n) for n in range(2, 1000, 4)]
    assert shard.get_many(shadowed) == {key: expected[key] for key in shadowed}
    newest = max(ranges)  # file numbers grow with age
    older = sum(counts.values()) - counts[newest]
    assert counts[newest] <= 10 and 0 < older < len(shadowed) // 10, counts
    shard.close()


# -- runs on disk ---------------------------------------------------------------------------------


def _published_runs(shard_dir: Path) -> list[tuple[Path, int, int]]:
    """Every run the manifest names: its path, tier and entry count."""
    manifest = load_manifest(shard_dir)
    assert manifest is not None
    return [(shard_dir / meta.name, meta.level, meta.entries) for meta in manifest.runs]


def _check_published_run(path: Path, entries: int, scratch: Path) -> None:
    # WAL mode is recorded in the header: file format write and read versions 2 (legacy: 1)
    header = path.read_bytes()[:100]
    assert header[:16] == b"SQLite format 3\x00"
    assert (header[18], header[19]) == (2, 2), f"{path.name} is not in WAL mode"
    copy = scratch / path.name  # a plain connection may add -wal and -shm files: not beside the run
    shutil.copyfile(path, copy)
    db = sqlite3.connect(copy)
    try:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        first_keys = [bytes(key) for (key,) in db.execute("SELECT first_key FROM blocks ORDER BY id")]
    finally:
        db.close()
    assert first_keys == sorted(set(first_keys))
    keys = [key for block_keys, _ in iter_blocks(path) for key in block_keys]
    assert len(keys) == entries and keys == sorted(set(keys))
    assert verify_run(path) == []


def test_published_runs_are_sqlite_files_in_wal_mode_with_their_blocks_in_key_order(tmp_path: Path) -> None:
    # Given a shard written in random key order, in batches, with overwrites and deletes
    shard_dir = tmp_path / "s"
    scratch = tmp_path / "copies"
    scratch.mkdir()
    shard = LsmShard(shard_dir, memtable_bytes=100_000, tier_fanout=2, background=False)
    keys = [os.urandom(16) for _ in range(6000)]
    for start in range(0, len(keys), 500):
        shard.put_many([(key, os.urandom(40)) for key in keys[start : start + 500]])
    shard.put_many([(key, b"again") for key in keys[::3]])
    shard.delete_many(keys[::5])
    # When the memtable is flushed
    shard.flush()
    flushed = _published_runs(shard_dir)
    # Then every run the manifest names is a SQLite file in WAL mode with its blocks in key order
    assert len(flushed) >= 2 and {level for _, level, _ in flushed} == {0}
    for path, _, entries in flushed:
        _check_published_run(path, entries, scratch)
    # And so is every run written by compaction
    shard.wait_for_compactions()
    compacted = _published_runs(shard_dir)
    assert any(level > 0 for _, level, _ in compacted)
    for path, _, entries in compacted:
        _check_published_run(path, entries, scratch)
    shard.close()


# -- fsync policy ---------------------------------------------------------------------------------


def test_interval_fsync_syncs_the_last_writes_once_the_writers_go_quiet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datamesh.storage.ap.lsm import log as log_module
    from datamesh.storage.ap.lsm.log import FsyncPolicy

    # Given a shard syncing its log at most every second, and a record of its syncs
    synced = threading.Event()
    fdatasync = log_module.os.fdatasync

    def noted(fd: int) -> None:
        fdatasync(fd)
        synced.set()

    shard = LsmShard(tmp_path / "s", fsync=FsyncPolicy.INTERVAL, fsync_interval_s=1.0, flush_interval_s=3600)
    monkeypatch.setattr(log_module.os, "fdatasync", noted)
    try:
        # When one batch is written within the interval (so its writer does not sync it) and no more come
        shard.put_many([(b"last-key", b"last value")])
        log = shard._log
        assert log._written > log._synced
        # Then the flusher thread syncs it once the interval has passed, with no write to trigger it
        assert synced.wait(timeout=HANG_GUARD_S), "the last batch was never synced"
        assert log._synced >= log._written
    finally:
        shard.close()
