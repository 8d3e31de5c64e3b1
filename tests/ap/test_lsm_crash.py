"""Crash safety: SIGKILL the writer mid-batch at many random moments, then check every invariant.

After each kill and restart: every acknowledged batch is present, no batch is partly visible,
every run passes SQLite's integrity check and its block checksums, and a torn log tail (the partial
record of a batch being written, appended here on every third round to stand for a write cut by
power loss) is detected and cut rather than replayed.

The loop runs under each fsync policy (50 rounds under the default ``always``, 10 each under
``interval`` and ``never``): a killed *process* loses nothing acknowledged under any of them, since
a batch is written to the log (the page cache, which outlives the process) before ``put_many``
returns; the policies differ only in what a crash of the machine can lose, which a process kill
cannot show.
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from datamesh.storage.ap.lsm import FsyncPolicy, LsmShard
from datamesh.storage.ap.lsm.format import encode_puts
from datamesh.storage.ap.lsm.log import FILE_HEADER, record_bytes
from datamesh.storage.ap.lsm.manifest import load_manifest
from datamesh.storage.ap.lsm.run import verify_run

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
from crash_writer import BATCH_ROWS, SHARD_OPTIONS, batch_items  # noqa: E402

ROUNDS = {FsyncPolicy.ALWAYS: 50, FsyncPolicy.INTERVAL: 10, FsyncPolicy.NEVER: 10}


@dataclass(frozen=True)
class Kill:
    """What the writer had reported when it was killed."""

    acked: list[int]
    in_flight: int | None
    """The batch the writer had announced (``start <b>``) but not acknowledged: the kill landed
    while it was inside ``put_many`` (or just around the call); None if it landed between batches."""


def _run_writer_until_killed(shard_dir: Path, first_batch: int, rng: random.Random, policy: FsyncPolicy) -> Kill:
    """Start the writer, SIGKILL it at a random moment after it is writing; report what it acked."""
    child = subprocess.Popen(
        [sys.executable, str(HERE / "crash_writer.py"), str(shard_dir), str(first_batch), policy.value],
        stdout=subprocess.PIPE,
        text=True,
    )
    acked: list[int] = []
    started: list[int] = []
    ready = threading.Event()

    def read() -> None:
        assert child.stdout is not None
        for line in child.stdout:
            word = line.split()
            if word == ["ready"]:
                ready.set()
            elif word[0] == "start":
                started.append(int(word[1]))
            else:
                acked.append(int(word[0]))

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert ready.wait(30), "writer did not start"
    time.sleep(rng.uniform(0.0, 0.4))
    child.send_signal(signal.SIGKILL)
    child.wait()
    reader.join(5)
    assert not reader.is_alive(), "the writer's output did not end"
    # Each line is flushed before the next step, so the last lines written before the kill are read.
    in_flight = started[-1] if started and (not acked or acked[-1] != started[-1]) else None
    return Kill(acked=list(acked), in_flight=in_flight)


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
@pytest.mark.parametrize("policy", list(ROUNDS), ids=[policy.value for policy in ROUNDS])
def test_sigkill_mid_batch_loses_no_acknowledged_batch_and_shows_no_partial_one(
    tmp_path: Path, policy: FsyncPolicy
) -> None:
    rounds = ROUNDS[policy]
    rng = random.Random(6)
    shard_dir = tmp_path / "shard.lsm"
    next_batch = 0
    acked_total: set[int] = set()
    torn_cut = 0
    killed_mid_batch = 0
    for round_ in range(rounds):
        # Given a writer under ``policy`` killed at a random moment
        kill = _run_writer_until_killed(shard_dir, next_batch, rng, policy)
        acked_total.update(kill.acked)
        killed_mid_batch += kill.in_flight is not None
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
        assert not missing, f"{policy} round {round_}: acknowledged batches lost or partial: {missing[:5]}"
        partial = {b: n for b, n in counts.items() if n != BATCH_ROWS}
        assert not partial, f"{policy} round {round_}: partial batches visible: {partial}"
        if kill.in_flight is not None:  # the batch being written is whole or absent, never half there
            assert counts.get(kill.in_flight, 0) in (0, BATCH_ROWS)
        if torn_batch is not None:
            assert int(recovery["torn_bytes_cut"]) > 0, recovery
            assert torn_batch not in counts
            torn_cut += 1
        manifest = load_manifest(shard_dir)
        assert manifest is not None
        for run in manifest.runs:
            assert verify_run(shard_dir / run.name) == [], run.name
        next_batch = max(counts, default=next_batch - 1) + 1
    assert torn_cut >= rounds // 3
    assert len(acked_total) > rounds  # the writer got real work acknowledged between kills
    # and some kills really landed while a batch was being written, not only between batches
    assert killed_mid_batch > 0, f"{policy}: no kill landed inside put_many in {rounds} rounds"
