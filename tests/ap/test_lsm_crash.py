"""Crash safety: SIGKILL the writer mid-batch at many random moments, then check every invariant.

After each kill and restart: every acknowledged batch is present, no batch is partly visible,
every run passes SQLite's integrity check and its block checksums, and a torn log tail (the partial
record of a batch being written, appended here on every third round to stand for a write cut by
power loss) is detected and cut rather than replayed.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from datamesh.storage.ap.lsm import LsmShard
from datamesh.storage.ap.lsm.format import encode_puts
from datamesh.storage.ap.lsm.log import FILE_HEADER, record_bytes
from datamesh.storage.ap.lsm.manifest import load_manifest
from datamesh.storage.ap.lsm.run import verify_run

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from crash_writer import BATCH_ROWS, SHARD_OPTIONS, batch_items  # noqa: E402

ROUNDS = 50


def _run_writer_until_killed(shard_dir: Path, first_batch: int, rng: random.Random) -> list[int]:
    """Start the writer, SIGKILL it at a random moment after it is writing; return acked batches."""
    child = subprocess.Popen(
        [sys.executable, str(HERE / "crash_writer.py"), str(shard_dir), str(first_batch)],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: list[int] = []
    ready = threading.Event()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            if line.strip() == "ready":
                ready.set()
            else:
                acked.append(int(line))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert ready.wait(30), "writer did not start"
    time.sleep(rng.uniform(0.0, 0.4))
    child.send_signal(signal.SIGKILL)
    child.wait()
    reader.join(5)
    return list(acked)


def _batch_counts(shard: LsmShard) -> Counter[int]:
    counts: Counter[int] = Counter()
    for keys, _ in shard.iter_all():
        counts.update(int.from_bytes(key[4:8], "big") for key in keys)
    return counts


def _append_torn_record(shard_dir: Path, batch: int, rng: random.Random) -> int:
    """Append a prefix of a real record (never acknowledged) to the newest log; return its length."""
    logs = sorted(shard_dir.glob("*.log"))
    payload, _, _ = encode_puts(batch_items(batch))
    record = record_bytes(10**12, payload)
    cut = rng.randrange(1, len(record))
    written = logs[-1].stat().st_size
    with open(logs[-1], "ab") as handle:
        if written < len(FILE_HEADER):  # killed before the writer had written the log's file header
            handle.write(FILE_HEADER[written:])
        handle.write(record[:cut])
    return cut


@pytest.mark.slow
def test_sigkill_mid_batch_loses_no_acknowledged_batch_and_shows_no_partial_one(tmp_path: Path) -> None:
    rng = random.Random(6)
    shard_dir = tmp_path / "shard.lsm"
    next_batch = 0
    acked_total: set[int] = set()
    torn_cut = 0
    for round_ in range(ROUNDS):
        # Given a writer killed at a random moment
        acked_total.update(_run_writer_until_killed(shard_dir, next_batch, rng))
        torn_batch = None
        if round_ % 3 == 2:
            torn_batch = 10**6 + round_
            _append_torn_record(shard_dir, torn_batch, rng)
        # When the shard is reopened (recovery replays the log)
        shard = LsmShard(shard_dir, background=False, **SHARD_OPTIONS)  # type: ignore[arg-type]
        try:
            counts = _batch_counts(shard)
            recovery = shard.last_recovery
        finally:
            shard.close()
        # Then acknowledged batches are whole, nothing is partial, the torn tail was cut
        missing = [b for b in acked_total if counts.get(b) != BATCH_ROWS]
        assert not missing, f"round {round_}: acknowledged batches lost or partial: {missing[:5]}"
        partial = {b: n for b, n in counts.items() if n != BATCH_ROWS}
        assert not partial, f"round {round_}: partial batches visible: {partial}"
        if torn_batch is not None:
            assert int(recovery["torn_bytes_cut"]) > 0, recovery
            assert torn_batch not in counts
            torn_cut += 1
        manifest = load_manifest(shard_dir)
        assert manifest is not None
        for run in manifest.runs:
            assert verify_run(shard_dir / run.name) == [], run.name
        next_batch = max(counts, default=next_batch - 1) + 1
    assert torn_cut >= ROUNDS // 3
    assert len(acked_total) > ROUNDS  # the writer got real work acknowledged between kills
