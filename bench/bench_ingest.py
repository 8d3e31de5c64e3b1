"""Local-mode ingest throughput and latency on real data, next to plain sqlite3 in the same run.

    python bench/bench_ingest.py [--single 400] [--batch-sizes 100,1000] [--cp-url URL]

Data: the AlpacaEval outputs in ../shared/data (805 prompts x 3 models).  Each measurement uses
fresh entity ids so nothing is deduplicated.  Baselines: the same rows written with the Python
sqlite3 module into one WAL table with synchronous=FULL — one transaction per row (what a single
ingest is up against) and one executemany per batch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamesh.core.config import DataMeshConfig
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest

Row = tuple[str, float, float, float]
DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval"


def load_rows() -> list[tuple[bytes, bytes]]:
    rows: list[tuple[bytes, bytes]] = []
    for model in ("gpt4", "claude", "llama-2-70b-chat-hf"):
        for r in json.loads((DATA / f"{model}.json").read_text(encoding="utf-8")):
            rows.append((r["instruction"].encode(), r["output"].encode()))
    return rows


def requests_for(rows: list[tuple[bytes, bytes]], n: int, entities: int = 64) -> list[IngestionRequest]:
    owners = [EntityId.generate() for _ in range(entities)]
    return [
        IngestionRequest(entity_id=owners[i % entities], prompt=p, response=r, geo_region=GeoRegion.EU_WEST)
        for i, (p, r) in enumerate(rows[i % len(rows)] for i in range(n))
    ]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def bench_pipeline(
    root: Path, rows: list[tuple[bytes, bytes]], single: int, sizes: list[int], cp_url: str, indexer: bool
) -> list[Row]:
    config = DataMeshConfig(
        data_dir=root / "pipeline", cp_url=cp_url, ingest_rate=1e9, ingest_burst=10**9, indexer=indexer
    )
    out = []
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        warm = requests_for(rows, 20)
        for r in warm:
            (await p.ingest(r)).unwrap()
        reqs = requests_for(rows, single)
        lat: list[float] = []
        t0 = time.perf_counter()
        for r in reqs:
            res = (await p.ingest(r)).unwrap()
            lat.append(res.latency_ms)
        wall = time.perf_counter() - t0
        out.append((f"pipeline ingest() x{single}", single / wall, pct(lat, 0.5), pct(lat, 0.99)))
        for size in sizes:
            batches = max(3, min(20, 6000 // size))
            lat = []
            t0 = time.perf_counter()
            for _ in range(batches):
                done = (await p.ingest_many(requests_for(rows, size))).unwrap()
                assert all(d.is_ok() for d in done)
                lat.append(done[0].unwrap().latency_ms)
            wall = time.perf_counter() - t0
            out.append(
                (f"pipeline ingest_many({size}) x{batches}", size * batches / wall, pct(lat, 0.5), pct(lat, 0.99))
            )
    return out


def bench_sqlite(root: Path, rows: list[tuple[bytes, bytes]], single: int, sizes: list[int]) -> list[Row]:
    db = sqlite3.connect(root / "baseline.sqlite3", isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE turns (id BLOB PRIMARY KEY, entity BLOB, prompt BLOB, response BLOB) WITHOUT ROWID")
    out = []

    def batch(n: int) -> list[tuple[bytes, bytes, bytes, bytes]]:
        picked = (rows[i % len(rows)] for i in range(n))
        return [(uuid.uuid4().bytes + uuid.uuid4().bytes, uuid.uuid4().bytes, p, r) for p, r in picked]

    items = batch(single)
    lat = []
    t0 = time.perf_counter()
    for item in items:
        s = time.perf_counter_ns()
        db.execute("BEGIN")
        db.execute("INSERT INTO turns VALUES (?, ?, ?, ?)", item)
        db.execute("COMMIT")
        lat.append((time.perf_counter_ns() - s) / 1e6)
    wall = time.perf_counter() - t0
    out.append((f"sqlite3 insert+commit per row x{single}", single / wall, pct(lat, 0.5), pct(lat, 0.99)))
    for size in sizes:
        batches = max(3, min(20, 6000 // size))
        lat = []
        t0 = time.perf_counter()
        for _ in range(batches):
            items = batch(size)
            s = time.perf_counter_ns()
            db.execute("BEGIN")
            db.executemany("INSERT INTO turns VALUES (?, ?, ?, ?)", items)
            db.execute("COMMIT")
            lat.append((time.perf_counter_ns() - s) / 1e6)
        wall = time.perf_counter() - t0
        out.append((f"sqlite3 executemany({size}) x{batches}", size * batches / wall, pct(lat, 0.5), pct(lat, 0.99)))
    db.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--single", type=int, default=400, help="ingest() calls to time")
    parser.add_argument("--batch-sizes", default="100,1000", help="ingest_many batch sizes")
    parser.add_argument("--cp-url", default="", help="CP database (default: SQLite in the temp folder)")
    parser.add_argument(
        "--indexer",
        choices=["on", "off"],
        default="off",
        help="run the background indexer in the same process while ingesting (its own bench: bench_index.py)",
    )
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",") if s]
    rows = load_rows()
    print(f"data: {len(rows)} AlpacaEval turns, mean response {statistics.mean(len(r) for _, r in rows):.0f} bytes")
    with tempfile.TemporaryDirectory(prefix="datamesh-bench-") as tmp:
        root = Path(tmp)
        ours = asyncio.run(bench_pipeline(root, rows, args.single, sizes, args.cp_url, args.indexer == "on"))
        base = bench_sqlite(root, rows, args.single, sizes)
    print(f"background indexer in the ingesting process: {args.indexer}")
    print(f"{'measurement':44} {'turns/s':>10} {'p50 ms':>9} {'p99 ms':>9}")
    for name, rate, p50, p99 in [*ours, *base]:
        print(f"{name:44} {rate:10.0f} {p50:9.2f} {p99:9.2f}")
    print("ratios (pipeline / plain sqlite3, same shape of write):")
    for (name, rate, _, _), (bname, brate, _, _) in zip(ours, base, strict=True):
        print(f"  {name:40} / {bname:36} = {rate / brate:.2f}")
    single_rate = ours[0][1]
    for name, rate, _, _ in ours[1:]:
        print(f"  {name} per turn is {rate / single_rate:.0f}x faster than ingest() in a loop")


if __name__ == "__main__":
    main()
