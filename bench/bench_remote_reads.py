"""Latency of AP reads from the shard files (``DATAMESH_AP_READS=files``) and through the shards'
owners (``workers``), in the same run.

    python bench/bench_remote_reads.py [--ap-engine sqlite|lsm] [--processes 1] [--conversations 200] [--rounds 5]

Starts ``python -m datamesh worker --role all --processes N`` (``--processes``, default 1) on a
fresh data folder and PostgreSQL schema, ingests ``--conversations`` AlpacaEval turns, then reads
each of them back ``--rounds`` times, one read at a time, twice: by a reader on the workers' data
folder that opens the shard files, and by one with an empty data folder of its own whose reads go
to the owner (``ap-read.<region>.<shard>``, answers in the result backend).  Reported per mode:
``p.get`` (CP rows + AP content + hash checks) and ``ap.get_many`` of one turn's key (the AP part
alone), p50 / p99 / mean in milliseconds; then ``get_many 4 sh``, one call for one key on each of
four shards (every shard is asked before any answer is awaited), next to ``4 x 1 shard``, the same
four keys read by four calls one after another.

Needs Redis (``--broker``, flushed at the start and the end: pick a database nobody else uses) and
PostgreSQL (``--pg``; the schema is dropped at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from statistics import mean

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
from sqlalchemy import create_engine, text

from bench.bench_celery import start_workers, wait_ready
from bench.bench_ingest import load_rows, pct, requests_for
from datamesh.core.config import DataMeshConfig
from datamesh.core.types import GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.storage.ap.record import turn_key
from datamesh.storage.cp import migrate
from datamesh.storage.cp.database import CpDatabase


async def measure(config: DataMeshConfig, ids: list[str], rounds: int) -> tuple[list[float], list[float]]:
    """Milliseconds of each ``p.get`` and each one-key ``ap.get_many``, one at a time."""
    gets: list[float] = []
    keys: list[float] = []
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        first = (await p.get(ids[0])).unwrap()  # warm-up: connections, the app, the shard handles
        for _ in range(rounds):
            for cid in ids:
                started = time.perf_counter()
                stored = (await p.get(cid)).unwrap()
                gets.append((time.perf_counter() - started) * 1000)
                key = turn_key(stored.entity_id, stored.conversation_id, stored.turns[0].turn_id)
                started = time.perf_counter()
                found = p.tiers.ap.get_many(GeoRegion.EU_WEST, [key]).unwrap()
                keys.append((time.perf_counter() - started) * 1000)
                assert found, cid
        assert first.turns
    return gets, keys


def spread_keys(stored: list[tuple[bytes, int]]) -> list[bytes]:
    """One key from each of the first four shards that hold one (fewer if fewer shards hold data)."""
    by_shard: dict[int, bytes] = {}
    for key, shard in stored:
        by_shard.setdefault(shard, key)
    return [by_shard[s] for s in sorted(by_shard)[:4]]


async def measure_spread(config: DataMeshConfig, keys: list[bytes], rounds: int) -> tuple[list[float], list[float]]:
    """Milliseconds of one ``get_many`` over ``keys`` (one per shard), and of one call per key in turn."""
    together: list[float] = []
    one_by_one: list[float] = []
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        ap = p.tiers.ap
        assert len(ap.get_many(GeoRegion.EU_WEST, keys).unwrap()) == len(keys)  # warm-up
        for _ in range(rounds * 50):
            started = time.perf_counter()
            assert len(ap.get_many(GeoRegion.EU_WEST, keys).unwrap()) == len(keys)
            together.append((time.perf_counter() - started) * 1000)
            started = time.perf_counter()
            for key in keys:
                assert ap.get_many(GeoRegion.EU_WEST, [key]).unwrap()
            one_by_one.append((time.perf_counter() - started) * 1000)
    return together, one_by_one


def line(mode: str, what: str, values: list[float]) -> str:
    return f"{mode:8} {what:14} {pct(values, 0.5):8.2f} {pct(values, 0.99):8.2f} {mean(values):8.2f} {len(values):7}"


@contextlib.asynccontextmanager
async def workers_on_host_a(
    pg: str, broker: str, ap_engine: str, processes: int = 1
) -> AsyncIterator[tuple[DataMeshConfig, Path]]:
    """``worker --role all --processes N`` on a fresh data folder (host A) and PostgreSQL schema:
    its configuration and the folder holding host A (and host B, a reader's empty one).  Redis
    ``broker`` is flushed at the start and the end; the schema is dropped at the end."""
    schema = f"bench_reads_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    pg_url = f"{pg}?options=-csearch_path%3D{schema}"
    db = CpDatabase.open(pg_url).unwrap()
    migrate.upgrade(db).unwrap()
    db.dispose()
    redis.Redis.from_url(broker).flushdb()
    try:
        with tempfile.TemporaryDirectory(prefix="datamesh-bench-reads-") as tmp:
            root = Path(tmp)
            owners = DataMeshConfig(
                data_dir=root / "host-a", cp_url=pg_url, executor="celery", broker_url=broker, ap_engine=ap_engine
            )
            env = {
                "DATAMESH_EXECUTOR": "celery",
                "DATAMESH_DATA_DIR": str(owners.data_dir),
                "DATAMESH_CP_URL": pg_url,
                "DATAMESH_BROKER_URL": broker,
                "DATAMESH_AP_ENGINE": ap_engine,
            }
            workers = start_workers(env, processes, root / "workers.log")
            try:
                wait_ready(owners, processes)
                yield owners, root
            finally:
                workers.terminate()
                workers.wait(timeout=30)
    finally:
        redis.Redis.from_url(broker).flushdb()
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


def common_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/6")
    parser.add_argument(
        "--pg", default=os.environ.get("DATAMESH_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ap-engine", choices=("sqlite", "lsm"), default="sqlite")
    parser.add_argument("--processes", type=int, default=1, help="worker processes owning the shards")
    common_arguments(parser)
    args = parser.parse_args()
    print(f"AP engine {args.ap_engine}; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    async with workers_on_host_a(args.pg, args.broker, args.ap_engine, args.processes) as (owners, root):
        async with (await IngestionPipeline.create(owners)).unwrap() as p:
            requests = requests_for(load_rows(), args.conversations)
            results = (await p.ingest_many(requests)).unwrap()
            done = [r.unwrap() for r in results]
            placed = [
                (turn_key(q.entity_id, r.conversation_id, r.turn_id), p.tiers.ap.shard_of(q.entity_id))
                for q, r in zip(requests, done, strict=True)
            ]
        ids = [str(r.unwrap().conversation_id) for r in results]
        await asyncio.sleep(3)  # LSM: let the owner flush, so the files reader waits for nothing
        remote = owners.with_changes(
            data_dir=root / "host-b", objects_url=owners.resolved_objects_url, ap_reads="workers"
        )
        print(f"{'reads':8} {'call':14} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'calls':>7}")
        for mode, config in (("files", owners), ("workers", remote)):
            gets, keys = await measure(config, ids, args.rounds)
            print(line(mode, "p.get", gets))
            print(line(mode, "ap.get_many", keys), flush=True)
        spread = spread_keys(placed)
        for mode, config in (("files", owners), ("workers", remote)):
            together, one_by_one = await measure_spread(config, spread, args.rounds)
            print(line(mode, f"get_many {len(spread)} sh", together))
            print(line(mode, f"{len(spread)} x 1 shard", one_by_one), flush=True)


if __name__ == "__main__":
    asyncio.run(main())
