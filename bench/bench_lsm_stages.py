"""CPU cost per row of each stage of the LSM write path, measured on its own thread's CPU clock.

    python bench/bench_lsm_stages.py --rows 2000000

Wall-clock throughput moves with whatever else the machine runs; a thread's CPU time
(``time.thread_time``) moves much less, though on a shared 2-core machine still by +-30% between
runs (caches, memory bandwidth): each stage is timed several times and its cheapest time kept,
and before/after comparisons should alternate runs.  The second line splits each stage's cheapest
time into user and kernel CPU (``getrusage(RUSAGE_THREAD)``): most of the noise is kernel time
(page faults on fresh memory, copies into the page cache, which on this VM cost far more when the
memory was not touched recently), so a change to the Python/numpy code shows best in the user column.
Stages, each run alone in this process on 16-byte random keys and 200-byte values:

* writer: ``put_many`` (cheapest window of 10) of batches of 10,000 (encode, log append, fdatasync, memtable append),
  on a shard whose memtable never fills (no flush on the writer's clock);
* flush: (cheapest of ``--fanout`` x ``--repeat``) one memtable of ``--memtable-mib`` sorted and written into a run;
* merge: (cheapest of ``--repeat``) ``--fanout`` such runs merged into one (one compaction pass), per row written;
* shard (only with ``--shard-rows N``): a whole shard with its background threads, ``N`` rows
  written, then flushed and compacted, on the *process*'s CPU clock (every thread, batch making
  included) per row: the stage that sees what crosses threads and files.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamesh.storage.ap.lsm import LsmShard
from datamesh.storage.ap.lsm.columns import Scratch
from datamesh.storage.ap.lsm.compaction import merge_columns
from datamesh.storage.ap.lsm.format import encode_puts
from datamesh.storage.ap.lsm.memtable import Memtable
from datamesh.storage.ap.lsm.run import fit_block_entries, iter_columns, write_run

BATCH = 10_000
KEY_BYTES = 16
VALUE_BYTES = 200
WINDOW = 10  # writer batches timed together; the cheapest window is kept


def clock() -> tuple[float, float]:
    """This thread's (total, user) CPU seconds."""
    return time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD).ru_utime


class Cheapest:
    """The cheapest per-row CPU time of several timings, with its user part."""

    def __init__(self) -> None:
        self.total = self.user = float("inf")

    def add(self, started: tuple[float, float], rows: int) -> None:
        total, user = clock()
        per_row = (total - started[0]) / rows
        if per_row < self.total:
            self.total, self.user = per_row, (user - started[1]) / rows


def batches(count: int, pool: list[bytes]) -> list[list[tuple[bytes, bytes]]]:
    out = []
    for number in range(count):
        blob = os.urandom(KEY_BYTES * BATCH)
        keys = [blob[i : i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]
        out.append(list(zip(keys, pool[number % len(pool) :] + pool[: number % len(pool)], strict=True)))
    return out


def writer_stage(root: Path, rows: int, pool: list[bytes]) -> Cheapest:
    shard = LsmShard(root / "writer", memtable_bytes=1 << 40, background=False)
    work = batches(rows // BATCH, pool)
    cheapest = Cheapest()
    for start in range(0, len(work), WINDOW):
        started = clock()
        for items in work[start : start + WINDOW]:
            shard.put_many(items)
        cheapest.add(started, len(work[start : start + WINDOW]) * BATCH)
    shard._log.close()  # skip the flush a close would do: only the writer is measured
    shard._release_writer_lock()
    return cheapest


def shard_stage(root: Path, rows: int, pool: list[bytes]) -> tuple[float, float]:
    """Process CPU (total, user) per row of writing ``rows`` through a shard and draining it."""
    shard = LsmShard(root / "shard")
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(rows // BATCH // 8):
        for items in batches(8, pool):  # made as it goes: all of a shard's batches would not fit in memory
            shard.put_many(items)
    shard.flush()
    shard.wait_for_compactions()
    after = resource.getrusage(resource.RUSAGE_SELF)
    shard.close()
    user = after.ru_utime - before.ru_utime
    return (user + after.ru_stime - before.ru_stime) / rows, user / rows


def memtable_of(rows: int, pool: list[bytes]) -> Memtable:
    memtable = Memtable(0)
    for sequence, items in enumerate(batches(rows // BATCH, pool), 1):
        payload, keys, values = encode_puts(items)
        memtable.apply_payload(payload, keys, values, sequence)
    return memtable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows for the writer stage")
    parser.add_argument("--memtable-mib", type=int, default=128)
    parser.add_argument("--fanout", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2, help="flush/merge repetitions (best kept)")
    parser.add_argument(
        "--block-entries", type=int, default=None, help="entries per run block (default: sized to fill pages)"
    )
    parser.add_argument("--shard-rows", type=int, default=0, help="also time a whole shard over this many rows")
    args = parser.parse_args()
    pool = [os.urandom(VALUE_BYTES) for _ in range(BATCH)]
    root = Path(tempfile.mkdtemp(prefix="lsm-stages-", dir=os.environ.get("BENCH_DIR")))
    try:
        if args.shard_rows:
            total, user = shard_stage(root, args.shard_rows, pool)
            print(f"shard (process CPU, batch making included) {total * 1e6:.3f}  user {user * 1e6:.3f} us per row")
        writer = writer_stage(root, args.rows, pool)
        per_memtable = (args.memtable_mib << 20) // (KEY_BYTES + VALUE_BYTES + 9) // BATCH * BATCH
        flush, merge = Cheapest(), Cheapest()
        flush_scratch, merge_scratch = Scratch(), Scratch()  # kept across flushes and merges, as by a shard's threads
        for attempt in range(args.repeat):
            paths = []
            for number in range(args.fanout):
                memtable = memtable_of(per_memtable, pool)
                path = root / f"run-{attempt}-{number}.sqlite3"
                started = clock()
                chunks = memtable.flush_chunks(scratch=flush_scratch)
                write_run(path, chunks, block_entries=args.block_entries, scratch=flush_scratch)
                flush.add(started, per_memtable)
                paths.append(path)
                del memtable
            out = root / f"merged-{attempt}.sqlite3"
            started = clock()
            streams = [iter_columns(path, KEY_BYTES) for path in reversed(paths)]
            merged = merge_columns(streams, drop_tombstones=True, scratch=merge_scratch)
            summary = write_run(out, merged, block_entries=args.block_entries, scratch=merge_scratch)
            assert summary is not None
            merge.add(started, summary.entries)
            for path in [*paths, out]:
                path.unlink()
        blocks = args.block_entries or f"fit to pages ({fit_block_entries(KEY_BYTES, KEY_BYTES + VALUE_BYTES)})"
        print(f"rows/memtable {per_memtable:,}  fanout {args.fanout}  block entries {blocks}")
        print("CPU us per row, this thread:")
        print(f"writer {writer.total * 1e6:.3f}  flush {flush.total * 1e6:.3f}  merge/pass {merge.total * 1e6:.3f}")
        print(
            f"  user {writer.user * 1e6:.3f}   user {flush.user * 1e6:.3f}   user {merge.user * 1e6:.3f}"
            "   (the rest is kernel time)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
