"""Write-path benchmark of the AP tier: the LSM against plain SQLite and RocksDB, in one run.

    python bench/bench_lsm.py --rows 50000000 --shards 2 --baseline-budget 180

Every engine writes 200-byte values under random 16-byte keys in batches of 10,000, one writer
process per shard (so the shards use every core), durably (LSM: log fdatasync per batch with group
commit; SQLite: WAL with synchronous=FULL; RocksDB: WriteBatch with sync=True).  Reported:

* acknowledged rows/s: rows / time spent inside the write call (log + memtable for the LSM);
* sustained rows/s: rows / wall time including flushes, compaction and the final drain
  (key/value generation excluded for every engine alike);
* a growth curve: aggregate rows/s over each tenth of the run (of its rows, or of its time budget
  for an engine the budget stops first), to see if the rate stays flat;
* the longest write call (the worst stall a writer saw) and the LSM's own stall counters;
* point lookups (present keys) and prefix scans (2-byte prefixes) per second, after the writes;
* write amplification (LSM: bytes written to log + runs / user bytes) and space amplification
  (bytes on disk / (rows x 216 bytes)).

Baselines stop at ``--baseline-budget`` seconds and report the size they reached.  The machine
and its load make the numbers noisy: run it on a quiet machine and compare within one run.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sqlite3
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

KEY_BYTES = 16
VALUE_BYTES = 200
ROW_BYTES = KEY_BYTES + VALUE_BYTES
CHECKPOINTS = 10


@dataclass(slots=True)
class ShardResult:
    """What one writer process measured."""

    rows: int = 0
    ack_seconds: float = 0.0
    gen_seconds: float = 0.0
    wall_seconds: float = 0.0
    drain_seconds: float = 0.0
    max_call_seconds: float = 0.0
    checkpoints: list[tuple[int, float]] = field(default_factory=list)  # (rows, wall - gen)
    sample: list[bytes] = field(default_factory=list)
    disk_bytes: int = 0
    lookups_per_s: float = 0.0
    scans_per_s: float = 0.0
    scan_rows_per_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class _Batches:
    """Fresh random keys per batch; values drawn from a pool of random batches (cheap to make)."""

    def __init__(self, batch: int, seed: int) -> None:
        self.batch = batch
        rng = random.Random(seed)
        self._values = [[rng.randbytes(VALUE_BYTES) for _ in range(batch)] for _ in range(8)]
        self._turn = 0

    def next(self) -> list[tuple[bytes, bytes]]:
        blob = os.urandom(KEY_BYTES * self.batch)
        keys = [blob[i : i + KEY_BYTES] for i in range(0, len(blob), KEY_BYTES)]
        self._turn += 1
        return list(zip(keys, self._values[self._turn % len(self._values)], strict=True))


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# -- engines: open, write a batch, finish (drain), read --------------------------------------------


class _Lsm:
    def __init__(self, path: Path, memtable_mb: int, fanout: int) -> None:
        from datamesh.storage.ap.lsm import LsmShard

        self.shard = LsmShard(path, memtable_bytes=memtable_mb * 1024 * 1024, tier_fanout=fanout)

    def write(self, items: list[tuple[bytes, bytes]]) -> None:
        self.shard.put_many(items)

    def drain(self) -> None:
        self.shard.flush()
        self.shard.wait_for_compactions()

    def lookup(self, keys: list[bytes]) -> int:
        return len(self.shard.get_many(keys))

    def scan(self, prefix: bytes) -> int:
        return sum(1 for _ in self.shard.scan_prefix(prefix))

    def extra(self) -> dict[str, Any]:
        s = self.shard.stats()
        return {
            "write_amp": s.write_amplification,
            "runs": s.runs_per_level,
            "stalls": s.stalls,
            "stall_max_s": s.stall_seconds_max,
            "stall_total_s": s.stall_seconds_total,
            "slowdown_total_s": s.slowdown_seconds_total,
            "compactions": s.compactions,
        }

    def close(self) -> None:
        self.shard.close()


class _Sqlite:
    def __init__(self, path: Path, memtable_mb: int, fanout: int) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path / "kv.sqlite3", isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID")

    def write(self, items: list[tuple[bytes, bytes]]) -> None:
        self.db.execute("BEGIN")
        self.db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", items)
        self.db.execute("COMMIT")

    def drain(self) -> None:
        self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def lookup(self, keys: list[bytes]) -> int:
        marks = ",".join("?" * len(keys))
        return len(self.db.execute(f"SELECT key, value FROM kv WHERE key IN ({marks})", keys).fetchall())

    def scan(self, prefix: bytes) -> int:
        if prefix == b"\xff" * len(prefix):
            return len(self.db.execute("SELECT key, value FROM kv WHERE key >= ?", (prefix,)).fetchall())
        upper = (int.from_bytes(prefix, "big") + 1).to_bytes(len(prefix), "big")
        return len(self.db.execute("SELECT key, value FROM kv WHERE key >= ? AND key < ?", (prefix, upper)).fetchall())

    def extra(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.db.close()


class _Rocks:
    def __init__(self, path: Path, memtable_mb: int, fanout: int) -> None:
        from rocksdict import Options, Rdict, WriteOptions

        options = Options(raw_mode=True)
        options.create_if_missing(True)
        options.increase_parallelism(2)
        self.db = Rdict(str(path), options=options)
        self.write_options = WriteOptions()
        self.write_options.sync = True

    def write(self, items: list[tuple[bytes, bytes]]) -> None:
        from rocksdict import WriteBatch

        batch = WriteBatch(raw_mode=True)
        for key, value in items:
            batch.put(key, value)
        self.db.write(batch, self.write_options)

    def drain(self) -> None:
        self.db.flush()

    def lookup(self, keys: list[bytes]) -> int:
        return sum(value is not None for value in self.db.get(keys))

    def scan(self, prefix: bytes) -> int:
        it = self.db.iter()
        it.seek(prefix)
        found = 0
        while it.valid() and bytes(it.key()).startswith(prefix):
            found += 1
            it.next()
        return found

    def extra(self) -> dict[str, Any]:
        return {"pending_compaction_bytes": self.db.property_int_value("rocksdb.estimate-pending-compaction-bytes")}

    def close(self) -> None:
        self.db.close()


ENGINES = {"lsm": _Lsm, "sqlite": _Sqlite, "rocksdb": _Rocks}


def run_shard(
    engine: str, path: str, rows: int, batch: int, budget_s: float, memtable_mb: int, fanout: int, seed: int
) -> ShardResult:
    """One writer process: write until ``rows`` or the budget, drain, then measure reads."""
    result = ShardResult()
    store = ENGINES[engine](Path(path), memtable_mb, fanout)
    batches = _Batches(batch, seed)
    step = max(batch, (rows // CHECKPOINTS) // batch * batch)
    started = time.perf_counter()
    while result.rows < rows and time.perf_counter() - started < budget_s:
        g0 = time.perf_counter()
        items = batches.next()
        g1 = time.perf_counter()
        store.write(items)
        g2 = time.perf_counter()
        result.gen_seconds += g1 - g0
        result.ack_seconds += g2 - g1
        result.max_call_seconds = max(result.max_call_seconds, g2 - g1)
        result.rows += len(items)
        if len(result.sample) < 20000:
            result.sample.extend(items[i][0] for i in range(0, len(items), 997))
        now = time.perf_counter() - started - result.gen_seconds
        last = result.checkpoints[-1][1] if result.checkpoints else 0.0
        # a tenth of the rows, or of the budget for an engine the budget stops first
        if result.rows % step == 0 or now - last >= budget_s / CHECKPOINTS:
            result.checkpoints.append((result.rows, now))
    d0 = time.perf_counter()
    store.drain()
    result.drain_seconds = time.perf_counter() - d0
    result.wall_seconds = time.perf_counter() - started - result.gen_seconds
    result.disk_bytes = _dir_bytes(Path(path))
    rng = random.Random(seed)
    keys = result.sample[:]
    rng.shuffle(keys)
    t0 = time.perf_counter()
    done = found = 0
    while done < len(keys) and time.perf_counter() - t0 < 10:
        chunk = keys[done : done + 500]
        found += store.lookup(chunk)
        done += len(chunk)
    result.lookups_per_s = done / (time.perf_counter() - t0)
    assert found == done, f"{engine}: {done - found} written keys not found"
    t0 = time.perf_counter()
    scans = scanned = 0
    while time.perf_counter() - t0 < 5:
        scanned += store.scan(rng.randbytes(2))
        scans += 1
    elapsed = time.perf_counter() - t0
    result.scans_per_s, result.scan_rows_per_s = scans / elapsed, scanned / elapsed
    result.extra = store.extra()
    store.close()
    return result


@dataclass(slots=True)
class EngineResult:
    engine: str
    shards: list[ShardResult]

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def acked(self) -> float:
        return sum(s.rows / s.ack_seconds for s in self.shards if s.ack_seconds)

    @property
    def sustained(self) -> float:
        return self.rows / max(s.wall_seconds for s in self.shards)

    @property
    def space_amp(self) -> float:
        return sum(s.disk_bytes for s in self.shards) / (self.rows * ROW_BYTES)

    def curve(self) -> list[tuple[int, float]]:
        """(total rows reached, aggregate rows/s over the segment) for each checkpoint all shards have."""
        points = min(len(s.checkpoints) for s in self.shards)
        out = []
        for i in range(points):
            rate = 0.0
            for s in self.shards:
                rows0, t0 = (0, 0.0) if i == 0 else s.checkpoints[i - 1]
                rows1, t1 = s.checkpoints[i]
                rate += (rows1 - rows0) / (t1 - t0)
            out.append((sum(s.checkpoints[i][0] for s in self.shards), rate))
        return out


def bench(engine: str, root: Path, args: argparse.Namespace, budget_s: float) -> EngineResult:
    base = root / engine
    shutil.rmtree(base, ignore_errors=True)
    per_shard = args.rows // args.shards
    print(
        f"[{time.strftime('%H:%M:%S')}] {engine}: {args.shards} writer processes, up to {per_shard:,} rows each, "
        f"budget {budget_s:.0f}s",
        flush=True,
    )
    with ProcessPoolExecutor(max_workers=args.shards, mp_context=get_context("spawn")) as pool:
        futures = [
            pool.submit(
                run_shard,
                engine,
                str(base / f"shard-{n:03d}"),
                per_shard,
                args.batch,
                budget_s,
                args.memtable_mb,
                args.fanout,
                n,
            )
            for n in range(args.shards)
        ]
        result = EngineResult(engine, [f.result() for f in futures])
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return result


def report(results: list[EngineResult]) -> None:
    rocks = next((r for r in results if r.engine == "rocksdb"), None)
    print()
    print(
        f"{'engine':<8} {'rows':>12} {'acked rows/s':>13} {'sustained/s':>12} {'x rocksdb':>9} {'max call s':>10} "
        f"{'drain s':>8} {'lookups/s':>10} {'scans/s':>8} {'scan rows/s':>11} {'W-amp':>6} {'S-amp':>6}"
    )
    for r in results:
        ratio = f"{r.sustained / rocks.sustained:.2f}" if rocks else "-"
        wamp = r.shards[0].extra.get("write_amp")
        wamp_text = f"{sum(s.extra['write_amp'] for s in r.shards) / len(r.shards):.2f}" if wamp else "-"
        print(
            f"{r.engine:<8} {r.rows:>12,} {r.acked:>13,.0f} {r.sustained:>12,.0f} {ratio:>9} "
            f"{max(s.max_call_seconds for s in r.shards):>10.3f} {max(s.drain_seconds for s in r.shards):>8.1f} "
            f"{sum(s.lookups_per_s for s in r.shards):>10,.0f} {sum(s.scans_per_s for s in r.shards):>8,.0f} "
            f"{sum(s.scan_rows_per_s for s in r.shards):>11,.0f} "
            f"{wamp_text:>6} "
            f"{r.space_amp:>6.2f}"
        )
    print("\ngrowth curve: aggregate rows/s over each tenth of the run (rows reached -> rate)")
    for r in results:
        points = "  ".join(f"{rows / 1e6:.1f}M:{rate / 1e3:.0f}k" for rows, rate in r.curve())
        print(f"  {r.engine:<8} {points}")
    for r in results:
        for n, s in enumerate(r.shards):
            if s.extra:
                print(f"  {r.engine} shard {n}: {s.extra}")


def measure_run_formats(root: Path, rows: int = 300_000) -> None:
    """Why runs pack blocks: flush rate of one sorted run, one SQLite row per key vs packed blocks."""
    from datamesh.storage.ap.lsm.run import RunWriter

    root.mkdir(parents=True, exist_ok=True)
    batches = _Batches(rows, 99)
    items = sorted(batches.next())
    keys = [k for k, _ in items]
    values: list[bytes | None] = [v for _, v in items]
    path = root / "row-per-key.sqlite3"
    path.unlink(missing_ok=True)
    t0 = time.perf_counter()
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=OFF")
    db.execute("PRAGMA synchronous=OFF")
    db.execute("CREATE TABLE kv (key BLOB PRIMARY KEY, value BLOB NOT NULL) WITHOUT ROWID")
    db.execute("BEGIN")
    db.executemany("INSERT INTO kv VALUES (?, ?)", items)
    db.execute("COMMIT")
    db.execute("PRAGMA journal_mode=WAL")
    db.close()
    rates = [("one row per key", rows / (time.perf_counter() - t0))]
    for block in (16, 64, 256):
        path = root / f"blocks-{block}.sqlite3"
        path.unlink(missing_ok=True)
        t0 = time.perf_counter()
        writer = RunWriter(path, block_entries=block)
        writer.add(keys, values)
        writer.finish()
        rates.append((f"packed blocks of {block}", rows / (time.perf_counter() - t0)))
    shutil.rmtree(root, ignore_errors=True)
    print(
        "run format (one sorted run of "
        + f"{rows:,} rows, build + fsync): "
        + ", ".join(f"{name} {rate:,.0f} rows/s" for name, rate in rates)
    )


def main() -> None:
    from datamesh.storage.ap.lsm import DEFAULT_MEMTABLE_BYTES, DEFAULT_TIER_FANOUT

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=50_000_000, help="total rows per engine, across shards")
    parser.add_argument("--shards", type=int, default=2, help="writer processes (one shard each)")
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--budget", type=float, default=1800, help="seconds the LSM may write")
    parser.add_argument("--baseline-budget", type=float, default=180, help="seconds each baseline may write")
    parser.add_argument("--memtable-mb", type=int, default=DEFAULT_MEMTABLE_BYTES >> 20, help="LSM memtable size")
    parser.add_argument("--fanout", type=int, default=DEFAULT_TIER_FANOUT, help="LSM size-tiered fanout")
    parser.add_argument("--engines", default="lsm,sqlite,rocksdb")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/datamesh-bench"))
    parser.add_argument("--keep", action="store_true", help="keep the data directories")
    args = parser.parse_args()
    print(
        f"bench_lsm: {args.rows:,} rows, batches of {args.batch:,}, {KEY_BYTES}-byte random keys, "
        f"{VALUE_BYTES}-byte values, {args.shards} shards, {os.cpu_count()} cpus, "
        f"python {sys.version.split()[0]}, sqlite {sqlite3.sqlite_version}"
    )
    measure_run_formats(args.dir / "run-format")
    results = []
    for engine in args.engines.split(","):
        budget = args.budget if engine == "lsm" else args.baseline_budget
        results.append(bench(engine, args.dir, args, budget))
    report(results)


if __name__ == "__main__":
    main()
