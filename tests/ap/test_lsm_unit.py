"""Unit tests of the LSM's parts: batch format, log, key filter, merge, runs, snapshots, readers, stats."""

from __future__ import annotations

import os
import sqlite3
import struct
import threading
import time
import zlib
from collections.abc import Callable
from itertools import pairwise
from pathlib import Path

import pytest
import xxhash

from datamesh.storage.ap.base import ShardError
from datamesh.storage.ap.fenced import VisibleAfterFlush
from datamesh.storage.ap.lsm import FsyncPolicy, LsmShard, format_stats
from datamesh.storage.ap.lsm.compaction import merge_blocks, pending_compactions, pick_compaction
from datamesh.storage.ap.lsm.filter import FilterBuilder, KeyFilter
from datamesh.storage.ap.lsm.format import FormatError, decode_entries, encode_entries
from datamesh.storage.ap.lsm.log import FILE_HEADER, HEADER, LOG_FORMAT, LogWriter, record_bytes, replay
from datamesh.storage.ap.lsm.manifest import RunMeta, load_manifest
from datamesh.storage.ap.lsm.run import Run, RunWriter, fit_block_entries, verify_run


def _keys(n: int) -> list[bytes]:
    return sorted(os.urandom(16) for _ in range(n))


def test_format_round_trips_values_and_tombstones() -> None:
    keys = [b"a", b"bb", b"", b"d" * 300]
    values = [b"1", None, b"", b"x" * 70000]
    assert decode_entries(encode_entries(keys, values)) == (keys, values)
    with pytest.raises(FormatError):
        decode_entries(encode_entries(keys, values)[:-1])
    with pytest.raises(TypeError):
        encode_entries([b"a", b"b"], [b"1", "not bytes"])  # type: ignore[list-item]
    with pytest.raises(TypeError):
        encode_entries([b"a", b"b"], [None, "not bytes"])  # type: ignore[list-item]


@pytest.mark.parametrize("cut", ["short header", "short payload", "checksum mismatch"])
def test_replay_cuts_a_torn_tail_and_keeps_whole_records(tmp_path: Path, cut: str) -> None:
    # Given a log with two whole records and a damaged third
    path = tmp_path / "1.log"
    writer = LogWriter(path, policy=FsyncPolicy.ALWAYS, fsync_interval_s=0)
    writer.append(1, b"first")
    writer.append(2, b"second")
    writer.sync(2)
    writer.close()
    whole = path.stat().st_size
    third = record_bytes(3, b"third record")
    damaged = {"short header": third[:5], "short payload": third[:-2], "checksum mismatch": third[:-1] + b"?"}[cut]
    with open(path, "ab") as handle:
        handle.write(damaged)
    # When the log is replayed
    result = replay(path)
    # Then the whole records come back, the tail is reported and cut from the file
    assert result.records == [(1, b"first"), (2, b"second")]
    assert result.reason == cut and result.truncated_bytes == len(damaged)
    assert path.stat().st_size == whole
    assert replay(path).truncated_bytes == 0


def test_a_log_record_is_framed_with_xxh3_seeded_by_its_sequence(tmp_path: Path) -> None:
    # Given a log with a record written whole and one written as parts
    path = tmp_path / "1.log"
    writer = LogWriter(path, policy=FsyncPolicy.ALWAYS, fsync_interval_s=0)
    writer.append(7, b"payload")
    writer.append(8, [b"pay", b"", b"load"])
    writer.close()
    data = path.read_bytes()
    # Then the file starts with its header, and each record is length | xxh3_64(payload, seed) | sequence
    assert data.startswith(b"DMLSMLOG") and b"DMLSMLOG" + struct.pack("<I", LOG_FORMAT) == FILE_HEADER
    record = HEADER.pack(7, xxhash.xxh3_64_intdigest(b"payload", 7), 7) + b"payload"
    assert data == FILE_HEADER + record + record_bytes(8, b"payload")
    assert record_bytes(7, b"payload") == record
    assert replay(path).records == [(7, b"payload"), (8, b"payload")]
    # And a record whose sequence was damaged fails its checksum
    damaged = bytearray(data)
    damaged[len(FILE_HEADER) + len(record) + 12] ^= 1  # the second record's sequence
    path.write_bytes(bytes(damaged))
    assert replay(path, repair=False).reason == "checksum mismatch"


def test_a_log_of_format_1_or_another_format_is_refused_with_both_versions_named(tmp_path: Path) -> None:
    # Given a format 1 log (no file header; u32 length | u32 crc32(sequence || payload) | u64 sequence)
    old = tmp_path / "1.log"
    payload = encode_entries([b"k"], [b"v"])
    crc = zlib.crc32(payload, zlib.crc32(struct.pack("<Q", 1)))
    old.write_bytes(struct.pack("<IIQ", len(payload), crc, 1) + payload)
    # Then it is refused, not cut as a torn tail
    with pytest.raises(FormatError, match=r"log format 1 \(no file header\), this datamesh reads log format 2"):
        replay(old)
    assert old.stat().st_size == 16 + len(payload)
    # And so is a log of a later format
    newer = tmp_path / "2.log"
    newer.write_bytes(b"DMLSMLOG" + struct.pack("<I", 9) + record_bytes(1, payload))
    with pytest.raises(FormatError, match="log format 9, this datamesh reads log format 2"):
        replay(newer)
    # And a shard with such a log refuses to open
    shard_dir = tmp_path / "s"
    LsmShard(shard_dir, background=False).close()
    (shard_dir / "99999999.log").write_bytes(old.read_bytes())
    with pytest.raises(FormatError, match="log format 1"):
        LsmShard(shard_dir, background=False)


@pytest.mark.parametrize("size", [0, 1, 5, 11])
def test_a_log_torn_inside_its_file_header_is_an_empty_log(tmp_path: Path, size: int) -> None:
    path = tmp_path / "1.log"
    path.write_bytes(FILE_HEADER[:size])
    result = replay(path)
    assert result.records == [] and result.truncated_bytes == size
    assert path.stat().st_size == 0


def test_group_commit_covers_writers_queued_behind_a_sync_with_one_more_sync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datamesh.storage.ap.lsm import log

    # Given a log whose syncs are counted, the first one held until released
    path = tmp_path / "1.log"
    writer = LogWriter(path, policy=FsyncPolicy.ALWAYS, fsync_interval_s=0)
    log_fd = writer._fd
    started: list[int] = []
    finished: list[int] = []
    first_sync_held = threading.Event()
    release_first_sync = threading.Event()

    def counted(real: Callable[[int], None]) -> Callable[[int], None]:
        def sync(fd: int) -> None:
            if fd == log_fd:
                started.append(fd)
                if len(started) == 1:
                    first_sync_held.set()
                    release_first_sync.wait(timeout=30)  # a hang guard only: the test releases it
            real(fd)
            if fd == log_fd:
                finished.append(fd)

        return sync

    monkeypatch.setattr(log.os, "fdatasync", counted(os.fdatasync))
    monkeypatch.setattr(log.os, "fsync", counted(os.fsync))
    append_lock = threading.Lock()
    sequences = iter(range(1, 100))
    syncs_done_when_acknowledged: dict[int, int] = {}

    def write(appended: threading.Event | None = None) -> None:
        with append_lock:
            sequence = next(sequences)
            writer.append(sequence, b"x" * 100)
        if appended is not None:
            appended.set()
        writer.sync(sequence)
        syncs_done_when_acknowledged[sequence] = len(finished)

    # When one writer's sync is in progress and eight more writers append and ask for a sync behind it
    first = threading.Thread(target=write)
    first.start()
    assert first_sync_held.wait(timeout=30)
    appended = [threading.Event() for _ in range(8)]
    queued = [threading.Thread(target=write, args=(event,)) for event in appended]
    for thread in queued:
        thread.start()
    assert all(event.wait(timeout=30) for event in appended)
    assert syncs_done_when_acknowledged == {}
    release_first_sync.set()
    for thread in [first, *queued]:
        thread.join(timeout=30)
        assert not thread.is_alive()
    # Then the eight queued writers shared one sync, and none was acknowledged before a sync covered it
    assert len(started) == 2
    assert syncs_done_when_acknowledged[1] >= 1
    assert all(syncs_done_when_acknowledged[sequence] == 2 for sequence in range(2, 10))
    # And every record replays, in order
    writer.close()
    assert [sequence for sequence, _ in replay(path).records] == list(range(1, 10))


def test_key_filter_has_no_false_negatives_and_few_false_positives() -> None:
    # Given the filter of a run's keys (in key order), partitioned by 1024 keys
    keys = _keys(20000)
    builder = FilterBuilder(1024)
    builder.add(keys[:5000])
    builder.add(keys[5000:])
    key_filter = KeyFilter.from_bytes(builder.finish().to_bytes(), 1024)
    # Then every key is found in its partition and random keys almost never are
    assert all(key_filter.may_contain(key, ordinal) for ordinal, key in enumerate(keys))
    assert sum(key_filter.may_contain(os.urandom(16), n % 20000) for n in range(20000)) < 3


def test_merge_keeps_the_newest_value_and_drops_tombstones_only_when_asked() -> None:
    newer = iter([([b"a", b"c"], [b"new-a", None])])
    older = iter([([b"a", b"b"], [b"old-a", b"old-b"]), ([b"c", b"d"], [b"old-c", b"old-d"])])
    merged = [
        pair
        for keys, values in merge_blocks([newer, older], drop_tombstones=False)
        for pair in zip(keys, values, strict=True)
    ]
    assert merged == [(b"a", b"new-a"), (b"b", b"old-b"), (b"c", None), (b"d", b"old-d")]
    newer = iter([([b"a", b"c"], [b"new-a", None])])
    older = iter([([b"c"], [b"old-c"])])
    assert [k for keys, _ in merge_blocks([newer, older], drop_tombstones=True) for k in keys] == [b"a"]


def test_size_tiered_pick_takes_the_lowest_full_tier() -> None:
    def meta(name: str, level: int, seq: int) -> RunMeta:
        return RunMeta(name, level, seq, 1, 0, 1, 1)

    runs = [meta("a", 1, 1), meta("b", 0, 5), meta("c", 0, 6), meta("d", 1, 2), meta("e", 0, 7)]
    assert pick_compaction(runs, 3) == (0, [runs[4], runs[2], runs[1]])
    assert pick_compaction(runs, 2) == (0, [runs[2], runs[1]])  # the oldest two, newest first
    assert pick_compaction(runs, 2, busy={0}) == (1, [runs[3], runs[0]])
    assert pick_compaction(runs, 4) is None
    assert pending_compactions(runs, 2) == 2


def test_a_run_answers_point_and_range_reads_and_passes_verification(tmp_path: Path) -> None:
    keys = _keys(1000)
    values: list[bytes | None] = [k * 2 for k in keys]
    values[10] = None
    writer = RunWriter(tmp_path / "1.sqlite3", block_entries=64)
    writer.add(keys[:500], values[:500])
    writer.add(keys[500:], values[500:])
    summary = writer.finish()
    assert (summary.entries, summary.tombstones) == (1000, 1)
    run = Run(tmp_path / "1.sqlite3")
    assert run.get(keys[3]) == keys[3] * 2
    assert run.get(keys[10]) is None
    assert run.get(b"\x00" * 16) is not None and run.get(b"\x00" * 16) is not keys[0]  # MISSING sentinel
    assert [k for k, _ in run.range_items(keys[100], keys[200])] == keys[100:200]
    assert verify_run(tmp_path / "1.sqlite3") == []
    run.release()


def test_verify_run_reports_a_corrupted_block(tmp_path: Path) -> None:
    import sqlite3

    keys = _keys(100)
    writer = RunWriter(tmp_path / "1.sqlite3", block_entries=10)
    writer.add(keys, list(keys))
    writer.finish()
    db = sqlite3.connect(tmp_path / "1.sqlite3")
    db.execute("UPDATE blocks SET checksum = ~checksum WHERE first_key = ?", (keys[0],))
    db.commit()
    db.close()
    assert any("checksum" in problem for problem in verify_run(tmp_path / "1.sqlite3"))


def test_compaction_drops_shadowed_values_and_keeps_deletes_effective(tmp_path: Path) -> None:
    # Given many flushed runs with overwrites and deletes, compacted down
    shard = LsmShard(tmp_path / "s", memtable_bytes=2000, tier_fanout=2, block_entries=4, background=False)
    keys = [b"k%04d" % i for i in range(200)]
    for round_ in range(3):
        shard.put_many([(k, b"v%d" % round_) for k in keys])
    shard.delete_many(keys[:50])
    shard.flush()
    shard.wait_for_compactions()
    stats = shard.stats()
    # Then reads see the newest values, deletes hold, and amplification is reported
    assert shard.get_many(keys) == {k: b"v2" for k in keys[50:]}
    assert shard.count() == 150
    assert stats.compactions > 0 and stats.pending_compactions == 0
    assert stats.write_amplification > 1.0
    shard.close()


def _live(state: dict[bytes, bytes | None]) -> list[tuple[bytes, bytes]]:
    return [(key, value) for key, value in sorted(state.items()) if value is not None]


def _run_files(shard_dir: Path) -> set[str]:
    return {path.name for path in shard_dir.glob("*.sqlite3")}


def _live_runs(shard: LsmShard) -> set[str]:
    return {meta.name for meta, _ in shard._runs}


def test_a_scan_sees_one_snapshot_while_compaction_replaces_runs(tmp_path: Path) -> None:
    # Given a shard of several tier-0 runs of thousands of entries each (more than the 4,096 a merge
    # buffers per source), with overwrites and deletes across runs and writes still in the memtable
    shard_dir = tmp_path / "s"
    shard = LsmShard(shard_dir, memtable_bytes=300_000, tier_fanout=2, background=False)
    state: dict[bytes, bytes | None] = {}

    def write(items: list[tuple[bytes, bytes]]) -> None:
        shard.put_many(items)
        state.update(items)

    def delete(keys: list[bytes]) -> None:
        shard.delete_many(keys)
        state.update(dict.fromkeys(keys))

    keys = [b"key-%012d" % (2 * i) for i in range(30_000)]  # even numbers: later keys land in between
    for start in range(0, len(keys), 1000):
        write([(key, b"first-" + key) for key in keys[start : start + 1000]])
    write([(key, b"second-" + key) for key in keys[::3]])
    delete(keys[::7])
    shard.flush()
    write([(key, b"memtable-" + key) for key in keys[::101]])
    assert len(shard._runs) >= 5 and min(run.entries for _, run in shard._runs) > 4096
    assert shard.stats().memtable_entries > 0
    snapshot = _live(state)
    # When a scan starts and reads its first chunks (it pins the runs it reads)
    scan = shard.iter_all()
    seen: list[tuple[bytes, bytes | None]] = []
    while len(seen) < 5000:
        seen.extend(zip(*next(scan), strict=True))
    assert len(seen) < len(snapshot)
    pinned = _live_runs(shard)
    # and, while it is open, new keys, overwrites and deletes are flushed and compaction replaces the runs
    write([(b"key-%012d" % (2 * i + 1), b"after") for i in range(0, 30_000, 5)])
    write([(key, b"after") for key in keys[1::4]])
    delete(keys[2::5])
    shard.flush()
    shard.wait_for_compactions()
    replaced = pinned - _live_runs(shard)
    # Then the replaced run files are kept while the scan is open
    assert len(replaced) >= 4
    assert replaced <= _run_files(shard_dir)
    # and the scan yields exactly the snapshot of its start: every key once, in order, the values of then
    for chunk_keys, chunk_values in scan:
        seen.extend(zip(chunk_keys, chunk_values, strict=True))
    assert seen == snapshot
    # And once the scan is done the replaced files are gone, and reads see the new state
    assert replaced.isdisjoint(_run_files(shard_dir))
    assert shard.count() == len(_live(state))
    assert shard.get_many([keys[1], keys[2]]) == {keys[1]: b"after"}
    # And a scan closed before its end lets the runs replaced meanwhile go as well
    write([(key, b"third") for key in keys[::2]])
    shard.flush()
    scan = shard.iter_all()
    next(scan)
    pinned = _live_runs(shard)
    write([(key, b"fourth") for key in keys[::2]])
    shard.flush()
    shard.wait_for_compactions()
    replaced = pinned - _live_runs(shard)
    assert replaced and replaced <= _run_files(shard_dir)
    scan.close()
    assert replaced.isdisjoint(_run_files(shard_dir))
    shard.close()


def test_a_reader_in_another_handle_sees_flushed_writes_within_the_flush_interval(tmp_path: Path) -> None:
    writer = LsmShard(tmp_path / "s", flush_interval_s=0.2)
    reader = LsmShard(tmp_path / "s", readonly=True)
    writer.put_many([(b"key", b"value")])
    assert writer.get_many([b"key"]) == {b"key": b"value"}  # read-your-writes at once
    deadline = time.monotonic() + 5
    while reader.get_many([b"key"]) == {} and time.monotonic() < deadline:
        time.sleep(0.05)
    assert reader.get_many([b"key"]) == {b"key": b"value"}
    writer.close()
    reader.close()


def test_a_waiting_reader_finds_a_committed_key_the_owner_has_not_flushed_yet(tmp_path: Path) -> None:
    writer = LsmShard(tmp_path / "s", flush_interval_s=0.3)
    reader = VisibleAfterFlush(LsmShard(tmp_path / "s", readonly=True), wait_s=5.0)
    # Given a batch acknowledged by the owner and still in its memtable,
    writer.put_many([(b"key", b"value")])
    # a lookup from another handle waits for the owner's flush and finds it,
    assert reader.get_many([b"key", b"key"]) == {b"key": b"value"}
    # while a key nobody wrote is reported missing once the wait is spent (not looked for forever).
    impatient = VisibleAfterFlush(LsmShard(tmp_path / "s", readonly=True), wait_s=0.2)
    started = time.monotonic()
    assert impatient.get_many([b"key", b"nobody"]) == {b"key": b"value"}
    assert 0.2 <= time.monotonic() - started < 2.0
    with pytest.raises(ShardError):
        reader.put_many([(b"k", b"v")])
    for shard in (writer, reader, impatient):
        shard.close()


def test_a_reader_replays_the_log_of_an_owner_that_died_before_flushing(tmp_path: Path) -> None:
    from datamesh.pipeline.tiers import readonly_engine_for

    # Given a batch acknowledged by an owner that died (log synced, memtable never flushed),
    owner = LsmShard(tmp_path / "shard-000.lsm", background=False)
    owner.put_many([(b"key", b"value")])
    owner._log.close()  # stand for SIGKILL: no close(), no flush
    owner._release_writer_lock()
    reader = readonly_engine_for("lsm")(tmp_path / "shard-000")
    # when a reader in another process looks the key up (no live writer holds the shard),
    found = reader.get_many([b"key"])
    # then it replays the dead owner's log as the next owner would, and finds the batch.
    assert found == {b"key": b"value"}
    assert LsmShard(tmp_path / "shard-000.lsm", readonly=True).get_many([b"key"]) == {b"key": b"value"}
    reader.close()


def _record_page_drops(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The (offset, length) of every page-cache drop (``POSIX_FADV_DONTNEED``) made from now on."""
    dropped: list[tuple[int, int]] = []
    advise = os.posix_fadvise

    def record(fd: int, offset: int, length: int, advice: int) -> None:
        assert advice == os.POSIX_FADV_DONTNEED
        dropped.append((offset, length))
        advise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", record)
    return dropped


def test_recovery_removes_orphan_runs_and_replays_the_log(tmp_path: Path) -> None:
    shard = LsmShard(tmp_path / "s", background=False)
    shard.put_many([(b"a", b"1")])
    shard._log.close()  # stand for a crash: leave without close()
    shard._release_writer_lock()
    (tmp_path / "s" / "00009999.sqlite3").write_bytes(b"half-written run")
    reopened = LsmShard(tmp_path / "s", background=False)
    assert reopened.get_many([b"a"]) == {b"a": b"1"}
    assert reopened.last_recovery["orphans_removed"] == 1
    assert not (tmp_path / "s" / "00009999.sqlite3").exists()
    reopened.close()


def test_stats_and_format_stats_describe_each_shard(tmp_path: Path) -> None:
    shard = LsmShard(tmp_path / "eu" / "shard-000.lsm", memtable_bytes=1000, background=False)
    shard.put_many([(os.urandom(16), os.urandom(100)) for _ in range(50)])
    assert shard.stats().memtable_entries == 50
    shard.flush()
    stats = shard.stats()
    assert stats.runs_per_level.get(0, 0) >= 1 and stats.run_bytes > 0
    text = format_stats(tmp_path)
    assert "eu/shard-000.lsm" in text and "L0:" in text
    shard.close()
    assert load_manifest(tmp_path / "eu" / "shard-000.lsm") is not None
    with pytest.raises(ShardError):
        shard.put_many([(b"k", b"v")])


def test_blocks_sized_to_fill_pages_make_a_smaller_run_that_reads_the_same(tmp_path: Path) -> None:
    # Given the same 20,000 entries of 16-byte keys and 200-byte values written with 64 entries per
    # block and with blocks sized to fill the pages
    keys = _keys(20_000)
    values: list[bytes | None] = [os.urandom(200) for _ in keys]
    sizes = {}
    for name, block_entries in (("fixed", 64), ("fit", None)):
        writer = RunWriter(tmp_path / f"{name}.sqlite3", block_entries=block_entries)
        for start in range(0, len(keys), 5000):
            writer.add(keys[start : start + 5000], values[start : start + 5000])
        sizes[name] = writer.finish().file_bytes
    # Then the fitted run holds 72 entries a block, reads back every entry, and is smaller
    run = Run(tmp_path / "fit.sqlite3")
    assert run.block_entries == fit_block_entries(16, 216) == 72
    assert all(run.get(k) == v for k, v in zip(keys[::97], values[::97], strict=True))
    assert [k for k, _ in run.range_items(keys[0], keys[-1])] == keys[:-1]
    assert verify_run(tmp_path / "fit.sqlite3") == []
    run.release()
    assert sizes["fit"] < sizes["fixed"] * 0.95


def test_background_threads_let_their_kept_buffers_go_once_idle(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datamesh.storage.ap.lsm import maintenance

    monkeypatch.setattr(maintenance, "IDLE_RELEASE_S", 0.5)
    # Given a shard whose flusher and compactor have just worked (small memtables, fanout 2)
    shard = LsmShard(tmp_path / "s", memtable_bytes=20_000, tier_fanout=2, flush_interval_s=0.2)
    try:
        for _batch in range(8):
            shard.put_many([(os.urandom(16), os.urandom(200)) for _ in range(200)])
        deadline = time.monotonic() + 10
        while shard.stats().compactions == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert shard.stats().compactions > 0 and shard.kept_buffer_bytes > 0
        # When nothing more is written, then within a few idle seconds they hold no buffer
        deadline = time.monotonic() + 10
        while shard.kept_buffer_bytes and time.monotonic() < deadline:
            time.sleep(0.1)
        assert shard.kept_buffer_bytes == 0
        # And the shard still works: a later write flushes and reads back
        key = b"k" * 16
        shard.put_many([(key, b"after idle")])
        shard.flush()
        assert shard.get_many([key]) == {key: b"after idle"}
    finally:
        shard.close()


def test_a_log_drops_only_durable_whole_pages_from_the_page_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datamesh.storage.ap.lsm import log

    # Given a log that drops its pages every 64 KiB synced, with the page-cache advice recorded
    monkeypatch.setattr(log, "DROP_CACHE_BYTES", 65536)
    dropped = _record_page_drops(monkeypatch)
    path = tmp_path / "1.log"
    writer = LogWriter(path, policy=FsyncPolicy.ALWAYS, fsync_interval_s=0)
    payloads = [os.urandom(10_000) for _ in range(40)]
    # When records are appended and synced one by one
    for sequence, payload in enumerate(payloads, start=1):
        writer.append(sequence, payload)
        writer.sync(sequence)
        # Then what was dropped is whole pages, contiguous, and never past what was synced
        end = dropped[-1][0] + dropped[-1][1] if dropped else 0
        assert end <= path.stat().st_size and end % log._PAGE == 0
    assert len(dropped) >= 5 and all(a + n == b for (a, n), (b, _) in pairwise(dropped))
    # And an unsynced policy never drops anything; replay still finds every record
    never = LogWriter(tmp_path / "2.log", policy=FsyncPolicy.NEVER, fsync_interval_s=0)
    count = len(dropped)
    for sequence, payload in enumerate(payloads, start=1):
        never.append(sequence, payload)
        never.sync(sequence)
    assert len(dropped) == count
    writer.close()
    never.close()
    assert [payload for _, payload in replay(path).records] == payloads


def test_a_run_opened_with_its_writers_index_reads_the_same_as_one_read_from_the_file(tmp_path: Path) -> None:
    from datamesh.storage.ap.lsm.run import write_run

    # Given a run of many blocks written in chunks
    keys = _keys(5000)
    values: list[bytes | None] = [os.urandom(200) for _ in keys]
    chunks = [(keys[start : start + 700], values[start : start + 700]) for start in range(0, len(keys), 700)]
    summary = write_run(tmp_path / "1.sqlite3", iter(chunks), block_entries=None)
    assert summary is not None
    # Then the writer's block index is the one the file holds, and a run given it reads back every entry
    from_file = Run(tmp_path / "1.sqlite3")
    assert summary.index == from_file.index and len(summary.index) > 1
    given = Run(tmp_path / "1.sqlite3", summary.index)
    assert all(given.get(k) == v for k, v in zip(keys, values, strict=True))
    assert [k for k, _ in given.range_items(keys[0], None)] == keys
    given.release()
    from_file.release()


def test_a_merge_input_read_with_drop_cache_drops_only_pages_behind_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datamesh.storage.ap.lsm import run as run_module
    from datamesh.storage.ap.lsm.run import iter_columns, write_run

    # Given a run of ~1 MiB, read in chunks by a reader that drops pages every 64 KiB read
    monkeypatch.setattr(run_module, "DROP_READ_BYTES", 65536)
    monkeypatch.setattr(run_module, "_DROP_READ_MARGIN", 65536)
    dropped = _record_page_drops(monkeypatch)
    keys = _keys(5000)
    values: list[bytes | None] = [os.urandom(200) for _ in keys]
    path = tmp_path / "1.sqlite3"
    write_run(path, iter([(keys, values)]), block_entries=None)
    size = path.stat().st_size
    read: list[bytes] = []
    for chunk in iter_columns(path, 16, entries_per_chunk=500, drop_cache=True):
        # Then every drop lies behind what was read so far, and drops follow one another
        assert not dropped or dropped[-1][0] + dropped[-1][1] <= size * (len(read) + len(chunk)) // len(keys)
        read.extend(chunk.to_lists()[0])
    assert read == keys
    assert len(dropped) > 3 and all(a + n == b for (a, n), (b, _) in pairwise(dropped))
    # And a reader without it drops nothing
    count = len(dropped)
    assert sum(len(chunk) for chunk in iter_columns(path, 16, entries_per_chunk=500)) == len(keys)
    assert len(dropped) == count


def test_a_reader_scans_runs_a_compaction_deleted_after_it_pinned_them(tmp_path: Path) -> None:
    from datamesh.storage.ap.lsm.run import iter_blocks

    # Given a reader in another process (here: a read-only handle) that pinned a run of 20 blocks,
    # and a writer whose compaction then deleted the file (readers cannot hold a writer off),
    writer = RunWriter(tmp_path / "00000001.sqlite3", block_entries=8)
    keys = _keys(160)
    values: list[bytes | None] = [k * 4 for k in keys]
    writer.add(keys, values)
    writer.finish()
    run = Run(tmp_path / "00000001.sqlite3")
    run.acquire()
    (tmp_path / "00000001.sqlite3").unlink()
    # when it scans the run, then it reads every block through the handle it holds,
    scanned = [
        (k, v) for block_keys, block_values in run.blocks() for k, v in zip(block_keys, block_values, strict=True)
    ]
    assert scanned == list(zip(keys, values, strict=True))
    # where opening the run again by name (what ``iter_all`` once did) fails.
    with pytest.raises(sqlite3.OperationalError, match="unable to open"):
        next(iter_blocks(tmp_path / "00000001.sqlite3"))
    run.release()
    run.release()
