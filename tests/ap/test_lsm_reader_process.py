"""A reader in another process than the writer: it sees flushed runs at once, unflushed writes
within the writer's flush interval, and never part of a batch.

The writer is a child process (``follow_writer.py``); this process opens the shard read-only, as
the API and index workers do.  The only timing in the test is a generous deadline (a hang guard).
"""

from __future__ import annotations

import queue
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from datamesh.storage.ap.lsm import LsmShard

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from crash_writer import BATCH_ROWS, batch_items  # noqa: E402
from follow_writer import FLUSHED, FOLLOW_OPTIONS  # noqa: E402

DEADLINE_S = 30.0  # a hang guard, 60x the writer's flush interval


def _batch_counts(shard: LsmShard) -> Counter[int]:
    """Keys per batch over the whole shard (a streaming scan of every run the reader sees)."""
    counts: Counter[int] = Counter()
    for keys, _ in shard.iter_all():
        counts.update(int.from_bytes(key[4:8], "big") for key in keys)
    return counts


def _found_per_batch(shard: LsmShard, batches: range) -> dict[int, int]:
    """Keys of each batch found by one ``get_many`` (one snapshot of the runs)."""
    items = {b: batch_items(b) for b in batches}
    found = shard.get_many([key for rows in items.values() for key, _ in rows])
    for rows in items.values():
        for key, value in rows:
            assert found.get(key, value) == value, key  # what is there is what was written
    return {b: sum(key in found for key, _ in rows) for b, rows in items.items()}


class _Child:
    """The writer process; its stdout lines arrive on a queue."""

    def __init__(self, shard_dir: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(HERE / "follow_writer.py"), str(shard_dir)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.acked: list[int] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("acked "):
                self.acked.append(int(line.split()[1]))
            self.lines.put(line.strip())

    def expect(self, prefix: str) -> str:
        while True:
            line = self.lines.get(timeout=DEADLINE_S)
            if line.startswith(prefix):
                return line

    def send(self, command: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()


def test_a_reader_in_another_process_sees_flushed_runs_at_once_and_unflushed_writes_within_the_flush_interval(
    tmp_path: Path,
) -> None:
    shard_dir = tmp_path / "shard.lsm"
    child = _Child(shard_dir)
    reader: LsmShard | None = None
    try:
        # Given a writer process that wrote and flushed batches 0..7 (compacting as it went)
        child.expect("flushed")
        # when this process opens the shard read-only,
        reader = LsmShard(shard_dir, readonly=True)
        # then every flushed batch is there, whole, at once;
        assert _found_per_batch(reader, range(FLUSHED)) == dict.fromkeys(range(FLUSHED), BATCH_ROWS)
        assert _batch_counts(reader) == Counter(dict.fromkeys(range(FLUSHED), BATCH_ROWS))
        # when the writer acknowledges batch 8 without flushing, and goes on writing a batch at a time,
        child.send("go")
        assert child.expect("acked ") == f"acked {FLUSHED}"
        # then the reader sees batch 8 once the writer's flusher publishes it (a memtable older than
        # flush_interval_s is flushed), and at every look each batch is whole or absent.
        deadline = time.monotonic() + DEADLINE_S
        looks = 0
        while True:
            looks += 1
            newest = max(child.acked)
            found = _found_per_batch(reader, range(newest + 1))
            partial = {b: n for b, n in found.items() if n not in (0, BATCH_ROWS)}
            assert not partial, f"look {looks}: partial batches visible: {partial}"
            assert all(found[b] == BATCH_ROWS for b in range(FLUSHED)), found
            counts = _batch_counts(reader)
            assert all(n == BATCH_ROWS for n in counts.values()), f"look {looks}: {counts}"
            if found[FLUSHED] == BATCH_ROWS:
                break
            interval = FOLLOW_OPTIONS["flush_interval_s"]
            assert time.monotonic() < deadline, (
                f"batch {FLUSHED} not visible in {DEADLINE_S} s (flush interval {interval} s)"
            )
            time.sleep(0.05)
        # and the batches are visible in acknowledgement order: none newer than one still missing.
        visible = [b for b, n in found.items() if n == BATCH_ROWS]
        assert visible == list(range(len(visible))), visible
    finally:
        if reader is not None:
            reader.close()
        if child.process.poll() is None:
            child.send("stop")
        assert child.process.wait(timeout=DEADLINE_S) == 0
