"""CPU per conversation, part by part, of the local executor with the indexer.

    python bench/bench_conv_cpu.py [--batch 5000] [--batches 4] [--repeat 3] [--profile ingest|drain]
                                   [--gc default|tuned|off]

Runs ``IngestionPipeline.ingest_many`` over batches of the real AlpacaEval rows against PostgreSQL
(``--pg``; a fresh schema per run, dropped at the end), with the background indexer off, then
drains the index outbox with ``indexer.drain_once`` in this thread.  CPU is measured with
``time.thread_time`` (the thread doing the work) and ``time.process_time``, steadier than wall time on a
shared machine; the PostgreSQL server's CPU is the utime+stime of this run's backends (``/proc``; the
run's connections are told apart by ``application_name``).

Parts: ``caller`` is everything of ``ingest_many`` outside the saga steps (validation, hashing,
idempotency keys, responses); ``reserve`` / ``write_ap`` / ``commit_cp`` are the saga steps
(``store_blobs`` is recorded by ``reserve`` when there are no large payloads); ``index.*`` are the
drain's parts.  The best of ``--repeat`` runs of each part is kept (the least disturbed one).
``--profile`` prints the cProfile top functions of one part.  ``--gc``: the garbage collector as
CPython starts it (``default``), as datamesh's workers and gateway set it (``tuned``,
``datamesh.core.gc_tuning.tune``), or disabled (``off``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import os
import pstats
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text

from bench.bench_ingest import load_rows, requests_for
from datamesh.core import gc_tuning
from datamesh.core.config import DataMeshConfig
from datamesh.pipeline import indexer, saga
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.storage.cp import migrate
from datamesh.storage.cp.database import CpDatabase

CLK_TCK = os.sysconf("SC_CLK_TCK")
cpu: dict[str, float] = defaultdict(float)  # part -> thread CPU seconds in the current run


@contextmanager
def timed(part: str) -> Iterator[None]:
    t0 = time.thread_time()
    try:
        yield
    finally:
        cpu[part] += time.thread_time() - t0


def wrap(module: Any, name: str, part: str) -> None:
    fn = getattr(module, name)

    def timed_fn(*args: Any, **kwargs: Any) -> Any:
        with timed(part):
            return fn(*args, **kwargs)

    setattr(module, name, timed_fn)


def backend_cpu(engine: Any, run: str) -> float:
    """CPU seconds used so far by this run's PostgreSQL backends: its connections carry the run's
    name as ``application_name`` (other users' backends on the same database are not counted; a
    backend of theirs that exits between two samples made the difference negative)."""
    with engine.connect() as conn:
        pids = [
            r[0] for r in conn.execute(text("SELECT pid FROM pg_stat_activity WHERE application_name = :a"), {"a": run})
        ]
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / CLK_TCK
    return total


async def one_run(
    pg: str, rows: list[tuple[bytes, bytes]], batch: int, batches: int, profile: str | None
) -> dict[str, float]:
    cpu.clear()
    schema = f"cpu_{uuid.uuid4().hex[:10]}"
    admin = create_engine(pg, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{pg}?options=-csearch_path%3D{schema}&application_name={schema}"
    db = CpDatabase.open(url).unwrap()
    migrate.upgrade(db).unwrap()
    db.dispose()
    prof = cProfile.Profile() if profile else None
    try:
        with tempfile.TemporaryDirectory(prefix="datamesh-cpu-") as tmp:
            config = DataMeshConfig(
                data_dir=Path(tmp), cp_url=url, ingest_rate=1e9, ingest_burst=10**9, max_in_flight=10**6, indexer=False
            )
            async with (await IngestionPipeline.create(config)).unwrap() as p:
                await p.ingest_many(requests_for(rows, 50))  # warm-up: connections, shards, index files
                (await p.flush_index()).unwrap()
                cpu.clear()
                run_batch = p._run_batch

                def timed_batch(*args: Any, **kwargs: Any) -> Any:
                    with timed("ingest (thread)"):
                        if prof is not None and profile == "ingest":
                            return prof.runcall(run_batch, *args, **kwargs)
                        return run_batch(*args, **kwargs)

                p._run_batch = timed_batch  # type: ignore[method-assign]
                pg_start = backend_cpu(admin, schema)
                proc0 = time.process_time()
                for _ in range(batches):
                    reqs = requests_for(rows, batch)
                    with timed("ingest (loop thread)"):
                        done = (await p.ingest_many(reqs)).unwrap()
                    assert all(d.is_ok() for d in done), next(d for d in done if d.is_err())
                cpu["ingest (process)"] = time.process_time() - proc0
                pg_mid = backend_cpu(admin, schema)
                cpu["pg server: ingest"] = pg_mid - pg_start
                settings = indexer.IndexerSettings(batch=config.index_batch)
                proc0 = time.process_time()
                with timed("index (thread)"):
                    while True:
                        if prof is not None and profile == "drain":
                            report = prof.runcall(
                                indexer.drain_once, p.tiers, p.indexes, settings, due_only=False
                            ).unwrap()
                        else:
                            report = indexer.drain_once(p.tiers, p.indexes, settings, due_only=False).unwrap()
                        assert not report.failed, report.errors
                        if report.claimed == 0:
                            break
                cpu["index (process)"] = time.process_time() - proc0
                cpu["pg server: index"] = backend_cpu(admin, schema) - pg_mid
        out = dict(cpu)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(35)
        pstats.Stats(prof).sort_stats("cumulative").print_stats(45)
    return out


def instrument() -> None:
    for name in ("reserve", "store_blobs", "write_ap", "commit_cp"):
        wrap(saga, name, f"saga.{name}")
    wrap(indexer, "documents_of_saga", "index.documents (CP+AP read, verify)")
    wrap(indexer, "index_documents", "index.add (FTS, vectors, recheck)")
    wrap(indexer, "_settle", "index.settle (outbox delete)")
    original: Callable[..., Any] = indexer.index_outbox.claim

    def claim(*args: Any, **kwargs: Any) -> Any:
        with timed("index.claim"):
            return original(*args, **kwargs)

    indexer.index_outbox.claim = claim  # type: ignore[attr-defined]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--profile", choices=["ingest", "drain"], default=None)
    parser.add_argument(
        "--pg", default=os.environ.get("DATAMESH_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")
    )
    parser.add_argument("--gc", choices=["default", "tuned", "off"], default="default")
    args = parser.parse_args()
    rows = load_rows()
    if args.gc == "tuned":
        gc_tuning.tune()
    elif args.gc == "off":
        gc.disable()
    instrument()
    runs = [
        asyncio.run(one_run(args.pg, rows, args.batch, args.batches, args.profile))
        for _ in range(1 if args.profile else args.repeat)
    ]
    n = args.batch * args.batches
    print(f"{n} conversations per run ({args.batches} x ingest_many({args.batch})), best of {len(runs)} runs")
    print(f"load average {os.getloadavg()[0]:.1f}; garbage collector: {args.gc}")
    print(f"{'part':44} {'CPU us/conv':>12} {'runs':>24}")
    for part in sorted(runs[0]):
        values = [r.get(part, 0.0) * 1e6 / n for r in runs]
        print(f"{part:44} {min(values):12.1f} {' '.join(f'{v:7.1f}' for v in values):>24}")


if __name__ == "__main__":
    main()
