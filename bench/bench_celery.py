"""End-to-end ingest through Celery with 1, 2 and 4 worker processes, next to the local executor and
raw baselines, in the same run.

    python bench/bench_celery.py [--processes 1,2,4] [--batch-sizes 100,1000,5000] [--turns 10000]
                                 [--ap-engine sqlite|lsm]

Needs Redis (``--broker``, default database 6 of the local server, flushed) and PostgreSQL
(``--pg``, default the test database; a fresh schema per executor run, dropped at the end).  Data: the AlpacaEval
outputs in ../shared/data, fresh entity ids per batch so nothing is deduplicated, all in one region.

* celery: ``python -m datamesh worker --role all --processes N`` (N Celery workers of one process,
  the AP shards dealt between them); ``clients`` concurrent ``ingest_many`` calls keep sagas in flight.
  Rate = turns committed / wall time; ``+indexed`` = the same turns / the time until the index
  outbox is empty again (committed and searchable); latency = one ``ingest_many`` call, enqueue to commit.
* local: the in-process executor on the same CP database, same batches, same concurrency.
* raw: the same rows with no saga, sequential batches, each durable (its making — ids, SHA-256
  hashes — included); each baseline has its own table and content store:

  - ``raw executemany``: SQLAlchemy ``text()`` ``executemany`` of the metadata (with psycopg2 that is
    one round trip a row: a weak floor, kept for comparison with earlier runs) and one SQLite
    ``executemany`` of the content (WAL, synchronous=FULL) a batch;
  - ``raw COPY+sqlite``: one ``COPY ... FROM STDIN`` of the metadata a batch (psycopg2
    ``copy_expert`` on the raw DBAPI connection) and the same SQLite content write;
  - ``raw COPY+lsm`` (only with ``--ap-engine lsm``): the same ``COPY``, the content into one of the
    project's LSM shards (``engine_for("lsm")``, the default log fsync) with one ``put_many`` a batch.

  After the table, each celery/local rate is printed as a share of the strong floor for the chosen
  AP engine (``raw COPY+sqlite``, or ``raw COPY+lsm``) at the same batch size.

Last, the CPU each celery/local measurement took per conversation, committed and indexed, by part
(``bench/cpu_meter.py``: the caller, the step workers, the index worker, this run's PostgreSQL
backends, the Redis server; from ``/proc``, so other users' load does not count), and the rate that
CPU allows on this machine's cores: a measured ceiling to set the rates and the target against.

Use ``--broker`` to pick a Redis database nobody else uses: it is flushed at the start and the end.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import io
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import redis
from sqlalchemy import create_engine, text

from bench.bench_ingest import load_rows, pct, requests_for
from bench.cpu_meter import CpuMeter, per_item_us
from datamesh.core import gc_tuning
from datamesh.core.config import DataMeshConfig
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.pipeline.tiers import engine_for
from datamesh.storage.cp import migrate
from datamesh.storage.cp.database import CpDatabase
from datamesh.workers.app import create_app

ROOT = Path(__file__).resolve().parents[1]
Row = tuple[str, float, float | None, float, float]
"""label, conv/s committed, conv/s committed and indexed (None: no index), p50 ms, p99 ms"""
DRAIN_TIMEOUT_S = 600.0
RAW_VARIANTS = {"sqlite": ("executemany", "copy+sqlite"), "lsm": ("executemany", "copy+sqlite", "copy+lsm")}
"""raw baselines run per ``--ap-engine``; the last is the floor the ratios are taken against"""
RAW_LABELS = {"executemany": "raw executemany", "copy+sqlite": "raw COPY+sqlite", "copy+lsm": "raw COPY+lsm"}


async def run_batches(
    p: IngestionPipeline,
    rows: list[tuple[bytes, bytes]],
    size: int,
    turns: int,
    clients: int,
    backlog: Callable[[], int],
) -> Row:
    """Ingest ``turns`` in batches of ``size`` from ``clients`` concurrent callers.

    Two rates: conversations committed per second (the clock stops when the last ``ingest_many``
    returns), and committed and indexed per second (it stops when ``backlog`` — the index outbox —
    is empty again; the index tier is eventually consistent, so it trails the commits).
    """
    batches = max(clients, turns // size)
    todo = list(range(batches))
    lat: list[float] = []
    failed: list[object] = []

    async def client() -> None:
        while todo:
            todo.pop()
            reqs = requests_for(rows, size)
            started = time.perf_counter()
            done = (await p.ingest_many(reqs)).unwrap()
            lat.append((time.perf_counter() - started) * 1000)
            bad = [d for d in done if d.is_err()]
            failed.extend(bad)

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    wall = time.perf_counter() - t0
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    while backlog() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # the local executor's indexer runs on this event loop
    drained = time.perf_counter() - t0 if not backlog() else float("inf")
    note = f", {len(failed)} failed" if failed else ""
    if failed:
        print(f"  first failure: {str(failed[0])[:300]}")
    committed = size * batches - len(failed)
    return (
        f"batch {size:5d} x{batches:3d}, {clients} clients{note}",
        committed / wall,
        committed / drained,
        pct(lat, 0.5),
        pct(lat, 0.99),
    )


def start_workers(config_env: dict[str, str], processes: int, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("DATAMESH_")},
        **config_env,
        "PYTHONPATH": str(ROOT),
    }
    cmd = [
        sys.executable,
        "-m",
        "datamesh",
        "worker",
        "--role",
        "all",
        "--processes",
        str(processes),
        "--loglevel",
        "WARNING",
    ]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def wait_ready(config: DataMeshConfig, count: int) -> None:
    app = create_app(config, load_celeryconfig=False)
    deadline = time.monotonic() + 60
    while len(app.control.ping(timeout=0.5)) < count:
        if time.monotonic() > deadline:
            raise SystemExit("workers did not start")


def backlog_of(pg_url: str) -> Callable[[], int]:
    """A counter of index outbox rows not yet done (one per committed saga and region)."""
    engine = create_engine(pg_url, pool_size=1)

    def owed() -> int:
        with engine.connect() as conn:
            return int(conn.execute(text("SELECT count(*) FROM index_outbox")).scalar_one())

    return owed


def _raw_batch(
    rows: list[tuple[bytes, bytes]], size: int
) -> tuple[list[tuple[bytes, bytes]], list[tuple[str, str, str, str]]]:
    """One batch of the raw baselines: content items (16-byte id, prompt + response) and metadata rows
    (id, entity, SHA-256 of the prompt and of the response); the hashing is part of the floor."""
    picked = [rows[i % len(rows)] for i in range(size)]
    ids = [uuid.uuid4() for _ in picked]
    items = [(i.bytes, p + r) for i, (p, r) in zip(ids, picked, strict=True)]
    meta = [
        (str(i), str(uuid.uuid4()), hashlib.sha256(p).hexdigest(), hashlib.sha256(r).hexdigest())
        for i, (p, r) in zip(ids, picked, strict=True)
    ]
    return items, meta


def _sqlite_content(path: Path) -> tuple[Callable[[list[tuple[bytes, bytes]]], None], Callable[[], None]]:
    """A plain SQLite content table (WAL, synchronous=FULL): one ``executemany`` transaction a batch."""
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=FULL")
    db.execute("CREATE TABLE IF NOT EXISTS kv (key BLOB PRIMARY KEY, value BLOB) WITHOUT ROWID")

    def write(items: list[tuple[bytes, bytes]]) -> None:
        db.execute("BEGIN")
        db.executemany("INSERT INTO kv VALUES (?, ?)", items)
        db.execute("COMMIT")

    return write, db.close


def _lsm_content(path: Path) -> tuple[Callable[[list[tuple[bytes, bytes]]], None], Callable[[], None]]:
    """One of the project's LSM shards, opened as the pipeline opens them (``engine_for("lsm")``, the
    default log fsync policy): one durable ``put_many`` a batch."""
    shard = engine_for("lsm", DataMeshConfig())(path)
    return shard.put_many, shard.close


def raw_baseline(root: Path, pg_url: str, rows: list[tuple[bytes, bytes]], size: int, turns: int, variant: str) -> Row:
    """The same rows as a batch of the pipeline, with no saga, sequential batches, each durable.

    ``variant``: ``executemany`` (SQLAlchemy ``text()`` executemany of the metadata, one round trip a
    row with psycopg2, and one SQLite ``executemany`` of the content), ``copy+sqlite`` (one
    ``COPY ... FROM STDIN`` of the metadata through the raw psycopg2 connection, the same SQLite
    content write) or ``copy+lsm`` (the same ``COPY``, the content into an LSM shard's ``put_many``).
    Each variant has its own PostgreSQL table and content store.  Time includes making the batch
    (ids, hashes); it excludes the final close (an LSM shard's last memtable flush).
    """
    table = "raw_turns_" + variant.replace("+", "_")
    engine = create_engine(pg_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                f"CREATE TABLE IF NOT EXISTS {table}"
                " (id uuid PRIMARY KEY, entity uuid, prompt_sha text, response_sha text)"
            )
        )
    content = root / f"raw-{variant.replace('+', '-')}"
    if variant.endswith("lsm"):
        write_content, close_content = _lsm_content(content)
    else:
        write_content, close_content = _sqlite_content(content.with_suffix(".sqlite3"))
    raw = engine.raw_connection() if variant.startswith("copy") else None
    batches = max(1, turns // size)
    lat = []
    t0 = time.perf_counter()
    try:
        for _ in range(batches):
            started = time.perf_counter()
            items, meta = _raw_batch(rows, size)
            write_content(items)
            if raw is None:
                with engine.begin() as conn:
                    conn.execute(
                        text(f"INSERT INTO {table} VALUES (CAST(:id AS uuid), CAST(:entity AS uuid), :p, :r)"),
                        [{"id": i, "entity": e, "p": p, "r": r} for i, e, p, r in meta],
                    )
            else:
                # uuids and hex digests need no COPY text escaping
                buffer = io.StringIO("".join(f"{i}\t{e}\t{p}\t{r}\n" for i, e, p, r in meta))
                cursor = raw.cursor()
                cursor.copy_expert(f"COPY {table} (id, entity, prompt_sha, response_sha) FROM STDIN", buffer)
                cursor.close()
                raw.commit()
            lat.append((time.perf_counter() - started) * 1000)
        wall = time.perf_counter() - t0
    finally:
        close_content()
        if raw is not None:
            raw.close()
        engine.dispose()
    return (f"batch {size:5d} x{batches:3d}, sequential", size * batches / wall, None, pct(lat, 0.5), pct(lat, 0.99))


def print_cpu(cpu_rows: list[tuple[str, int, dict[str, float]]]) -> None:
    """CPU µs per conversation by part, committed and indexed, and the rate that CPU allows here."""
    parts = ["caller", "step workers", "index worker", "postgres", "redis"]
    cores = os.cpu_count() or 1
    print(f"\nCPU per conversation, committed and indexed (µs; /proc; 'ceiling' = {cores} cores / total):")
    print(f"{'executor':16} {'batch':>6} " + " ".join(f"{p:>13}" for p in parts) + f" {'total':>8} {'ceiling/s':>10}")
    for who, size, us in cpu_rows:
        cells = " ".join(f"{us.get(p, 0.0):13.0f}" for p in parts)
        print(f"{who:16} {size:6d} {cells} {us['total']:8.0f} {cores * 1e6 / us['total']:10.0f}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--batch-sizes", default="100,1000,5000")
    parser.add_argument(
        "--turns", type=int, default=10000, help="turns per measurement (at least one batch per client)"
    )
    parser.add_argument("--ap-engine", choices=("sqlite", "lsm"), default="sqlite", help="AP shard engine")
    parser.add_argument("--broker", default="redis://127.0.0.1:6379/6")
    parser.add_argument(
        "--pg", default=os.environ.get("DATAMESH_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    )
    args = parser.parse_args()
    gc_tuning.tune()  # the caller's process is tuned as the gateway's is (``python -m datamesh serve``)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    counts = [int(s) for s in args.processes.split(",")]
    rows = load_rows()
    print(
        f"data: {len(rows)} AlpacaEval turns; AP engine {args.ap_engine}; machine: {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    prefix = f"bench_{uuid.uuid4().hex[:10]}"
    admin = create_engine(args.pg, isolation_level="AUTOCOMMIT")
    schemas: list[str] = []

    def fresh_schema(name: str) -> str:
        """A migrated schema of its own per executor run: an indexer never meets another run's outbox
        rows, whose content lives in that run's data folder."""
        schema = f"{prefix}_{name}"
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        schemas.append(schema)
        # application_name: the CPU meter tells this run's PostgreSQL backends from others' by it
        url = f"{args.pg}?options=-csearch_path%3D{schema}&application_name={schema}"
        db = CpDatabase.open(url).unwrap()
        migrate.upgrade(db).unwrap()
        db.dispose()
        return url

    results: list[tuple[str, int, Row]] = []
    cpu_rows: list[tuple[str, int, dict[str, float]]] = []
    broker_info = redis.Redis.from_url(args.broker).info("server")
    redis_pid = int(broker_info["process_id"]) if Path(f"/proc/{broker_info['process_id']}").exists() else None

    async def measured(
        meter: CpuMeter, who: str, p: IngestionPipeline, size: int, turns: int, clients: int, backlog: Callable[[], int]
    ) -> Row:
        """``run_batches`` with the CPU it took by part, per conversation, until the index outbox was
        empty again (the index drains' CPU included)."""
        before = meter.snapshot()
        row = await run_batches(p, rows, size, turns, clients, backlog)
        items = size * max(clients, turns // size)  # what run_batches ingests
        cpu_rows.append((who, size, per_item_us(before, meter.snapshot(), items)))
        return row

    def report(who: str, size: int, row: Row) -> None:
        results.append((who, size, row))
        indexed = f"{row[2]:9.0f}" if row[2] is not None else f"{'-':>9}"
        print(f"{who:16} {row[0]:44} {row[1]:9.0f} {indexed} {row[3]:9.1f} {row[4]:9.1f}", flush=True)

    print(
        f"{'executor':16} {'measurement':44} {'conv/s':>9} {'+indexed':>9} {'p50 ms':>9} {'p99 ms':>9}"
        "   (conv/s: committed; +indexed: committed and searchable)",
        flush=True,
    )
    try:
        with tempfile.TemporaryDirectory(prefix="datamesh-bench-celery-") as tmp:
            root = Path(tmp)
            for processes in counts:
                redis.Redis.from_url(args.broker).flushdb()
                pg_url = fresh_schema(f"celery{processes}")
                config = DataMeshConfig(
                    data_dir=root / f"celery-{processes}",
                    cp_url=pg_url,
                    executor="celery",
                    broker_url=args.broker,
                    ap_engine=args.ap_engine,
                    ingest_rate=1e9,
                    ingest_burst=10**9,
                    max_in_flight=10**6,
                )
                env = {
                    "DATAMESH_EXECUTOR": "celery",
                    "DATAMESH_DATA_DIR": str(config.data_dir),
                    "DATAMESH_CP_URL": pg_url,
                    "DATAMESH_BROKER_URL": args.broker,
                    "DATAMESH_AP_ENGINE": args.ap_engine,
                }
                workers = start_workers(env, processes, root / f"workers-{processes}.log")
                try:
                    wait_ready(config, processes)
                    backlog = backlog_of(pg_url)
                    meter = CpuMeter(workers.pid, admin, f"{prefix}_celery{processes}", redis_pid)
                    async with (await IngestionPipeline.create(config)).unwrap() as p:
                        await run_batches(p, rows, 100, 200, 2, backlog)  # warm-up
                        for size in sizes:
                            clients = max(2, 2 * processes)
                            who = f"celery {processes} proc"
                            turns = max(args.turns, size * clients)
                            row = await measured(meter, who, p, size, turns, clients, backlog)
                            report(who, size, row)
                finally:
                    workers.terminate()  # a warm shutdown: running tasks finish, LSM memtables are flushed
                    try:
                        workers.wait(timeout=180)
                    except subprocess.TimeoutExpired:
                        print(f"workers did not stop within 180 s: killed ({processes} processes)")
                        workers.kill()
                        workers.wait()
            local_url = fresh_schema("local")
            local = DataMeshConfig(
                data_dir=root / "local",
                cp_url=local_url,
                ap_engine=args.ap_engine,
                ingest_rate=1e9,
                ingest_burst=10**9,
                max_in_flight=10**6,
            )
            backlog = backlog_of(local_url)
            meter = CpuMeter(None, admin, f"{prefix}_local", redis_pid=None)
            async with (await IngestionPipeline.create(local)).unwrap() as p:
                await run_batches(p, rows, 100, 200, 1, backlog)
                for size in sizes:
                    row = await measured(meter, "local executor", p, size, max(args.turns, size * 2), 2, backlog)
                    report("local executor", size, row)
            raw_url = fresh_schema("raw")
            for variant in RAW_VARIANTS[args.ap_engine]:
                for size in sizes:
                    row = raw_baseline(root, raw_url, rows, size, max(args.turns, size), variant)
                    report(RAW_LABELS[variant], size, row)
            floor = RAW_LABELS[RAW_VARIANTS[args.ap_engine][-1]]
            print(f"\nconv/s committed as a share of {floor!r} (the strong floor), same batch size:")
            for size in sizes:
                best = next(r[1] for who, n, r in results if who == floor and n == size)
                shares = [
                    f"{who} {r[1] / best:.0%}" for who, n, r in results if n == size and not who.startswith("raw")
                ]
                print(f"  batch {size:5d}: " + ", ".join(shares))
            print_cpu(cpu_rows)
    finally:
        with admin.connect() as conn:
            for schema in schemas:
                conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
        redis.Redis.from_url(args.broker).flushdb()
    print(f"load average at end: {os.getloadavg()[0]:.1f} (the machine is shared: numbers move with other users' load)")


if __name__ == "__main__":
    asyncio.run(main())
