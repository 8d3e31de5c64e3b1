"""The machine's own ceiling for the writes every datamesh conversation needs, with nothing else running.

    python bench/bench_ceiling.py [--pg-url URL] [--streams 1,2,4] [--batch 5000] [--batches 4]

Two engines do work per conversation that no datamesh code can avoid: PostgreSQL stores the CP
rows and SQLite FTS5 makes the turn searchable.  This measures each raw, without datamesh's Python
in the timed part, and sets the CPU they take against the machine's cores.

**PostgreSQL.** What a committed conversation costs the CP tier at the least: its rows (one conversation, one
turn, two provenance records, one idempotency key), exactly as the pipeline writes them, loaded by
raw ``COPY`` (psycopg2 ``copy_expert``), one transaction per batch, into the migrated CP schema
(``schema``: its keys, unique constraints, indexes and foreign keys) and into a copy of it without
the foreign keys (``no FK``); ``bare`` loads only the conversation and turn rows, without foreign
keys: the least any CP tier that makes a turn visible could write.

The rows come from one real ``reserve`` + ``commit_cp`` of ``--batch`` AlpacaEval turns; every
copy gets fresh ids (conversations, turns, sagas, idempotency keys).  Each of ``--streams``
processes builds all its ``COPY`` text before the clock starts, then loads ``--batches`` batches
on a connection of its own; the streams start together.  conv/s = all streams' conversations over
the wall time from the start to the last commit.  Nothing of datamesh runs in the timed part: no
saga rows, no step records, no outbox, no AP shard, no index, no broker.  So the best of these
rates bounds any end-to-end rate on this machine that keeps these rows in PostgreSQL.  PG CPU is
the CPU time of the streams' backends (``/proc``), per conversation.

**FTS5.** The same turns inserted into an FTS5 table made as the index tier makes its tables (same
tokenizer, same ``hashsize``), segmented as the index segments them, one ``executemany`` and
transaction a batch, on a WAL file with ``synchronous=NORMAL``; the CPU time of this process per turn.

**Committed only** = cores / PG CPU per conversation (the least PG CPU of the ``schema`` runs): what
the CP tier alone allows even if the index fell behind for good.  **Sustained ceiling** = cores /
(PG CPU + FTS5 CPU) per conversation: the most conversations a
second that can be committed *and* indexed for as long as the load lasts (the index may trail
during a burst, but a rate it cannot keep up with grows its backlog without end).
"""

from __future__ import annotations

import argparse
import io
import multiprocessing as mp
import os
import re
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text

from bench.bench_cp import DEFAULT_PG_URL, ROWS_OF_SAGA, TABLES, _copy_value, load_rows, requests_for
from bench.cpu_meter import cpu_seconds
from datamesh.core.config import DataMeshConfig
from datamesh.pipeline.prepare import prepare
from datamesh.pipeline.request import validate
from datamesh.pipeline.steps import commit_cp, reserve
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import migrate
from datamesh.storage.cp.database import CpDatabase
from datamesh.storage.index.fulltext import _FTS, FTS_HASH_BYTES
from datamesh.storage.index.text_query import segment

_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
Template = dict[str, tuple[list[str], str]]  # table -> (columns, COPY text)
PER_CONVERSATION = {"conversations": 1, "turns": 1, "provenance_records": 2, "idempotency_keys": 1}


def template_rows(pg_url: str, schema: str, batch: int) -> Template:
    """The CP rows of one real ``reserve`` + ``commit_cp`` of ``batch`` turns, as COPY text per table."""
    url = f"{pg_url}?options=-csearch_path%3D{schema}"
    tiers = Tiers.open(DataMeshConfig(data_dir=Path("/tmp") / schema, cp_url=url)).unwrap()
    try:
        requests = requests_for(load_rows(), batch)
        prepared = [prepare(i, validate(r, max_payload_bytes=1 << 30).unwrap()) for i, r in enumerate(requests)]
        plan = reserve(tiers, "bench", prepared, shard_count=4).unwrap().plan
        commit_cp(tiers, plan).unwrap()
    finally:
        tiers.close()
    engine = create_engine(url)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        out: Template = {}
        for table in TABLES:
            cursor.execute(f'SELECT * FROM "{schema}"."{table}" WHERE {ROWS_OF_SAGA[table]}', {"s": plan.saga_id})
            columns = [d[0] for d in cursor.description]
            keep = [i for i, c in enumerate(columns) if not (table == "provenance_records" and c == "id")]
            lines = ["\t".join(_copy_value(row[i]) for i in keep) for row in cursor.fetchall()]
            out[table] = ([columns[i] for i in keep], "\n".join(lines) + "\n")
        raw.rollback()
    finally:
        raw.close()
        engine.dispose()
    return out


def fresh_copy(template: Template, tag: str) -> dict[str, str]:
    """The template's COPY text with every uuid and idempotency key replaced, consistently across tables."""
    new: dict[str, str] = {}

    def swap(m: re.Match[str]) -> str:
        old = m.group(0)
        if old not in new:
            new[old] = str(uuid.uuid4())
        return new[old]

    return {t: _UUID.sub(swap, body).replace("\tbench-", f"\t{tag}-") for t, (_, body) in template.items()}


def stream(
    dsn: str, schema: str, template: Template, tables: tuple[str, ...], batches: int, tag: str, start: Any, done: Any
) -> None:
    import psycopg2  # type: ignore[import-untyped]

    copies = [fresh_copy(template, f"{tag}x{b}") for b in range(batches)]
    conn = psycopg2.connect(dsn, options=f"-csearch_path={schema}", application_name=f"ceiling-{tag}")
    cursor = conn.cursor()
    cursor.execute("SELECT pg_backend_pid()")
    backend = int(cursor.fetchone()[0])
    start.wait()
    cpu0 = cpu_seconds(backend) or 0.0
    for copy in copies:
        for table in tables:
            columns = template[table][0]
            cursor.copy_expert(f'COPY "{table}" ({", ".join(columns)}) FROM STDIN', io.StringIO(copy[table]))
        conn.commit()
    done.put((time.perf_counter(), (cpu_seconds(backend) or 0.0) - cpu0))
    conn.close()


def measure(
    dsn: str, schema: str, template: Template, tables: tuple[str, ...], streams: int, batches: int
) -> tuple[float, float]:
    ctx = mp.get_context("fork")
    start = ctx.Barrier(streams + 1)
    done: Any = ctx.Queue()
    procs = [
        ctx.Process(
            target=stream,
            args=(dsn, schema, template, tables, batches, f"s{uuid.uuid4().hex[:8]}", start, done),
        )
        for _ in range(streams)
    ]
    for p in procs:
        p.start()
    start.wait()
    t0 = time.perf_counter()
    ends, cpu = zip(*(done.get(timeout=600) for _ in procs), strict=True)
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"a COPY stream failed (exit code {p.exitcode})")
    return max(ends) - t0, sum(cpu)


def fts_cpu_per_turn(rows: list[tuple[bytes, bytes]], batch: int, batches: int) -> float:
    """CPU seconds per turn of FTS5 inserts of ``rows`` (cycled), ``batches`` transactions of ``batch``."""
    texts = [(segment(p.decode()), segment(r.decode())) for p, r in rows]
    with tempfile.TemporaryDirectory() as tmp:
        db = sqlite3.connect(Path(tmp) / "index.sqlite3", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(_FTS.format(n=1))
        db.execute("INSERT INTO fts_1(fts_1, rank) VALUES ('hashsize', ?)", (FTS_HASH_BYTES,))
        spent = 0.0
        for b in range(batches):
            chunk = [(b * batch + i + 1, *texts[(b * batch + i) % len(texts)]) for i in range(batch)]
            started = time.process_time()
            db.execute("BEGIN")
            db.executemany("INSERT INTO fts_1(rowid, prompt, response) VALUES (?, ?, ?)", chunk)
            db.execute("COMMIT")
            spent += time.process_time() - started
        db.close()
    return spent / (batch * batches)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", default=os.environ.get("DATAMESH_TEST_PG_URL", DEFAULT_PG_URL))
    parser.add_argument("--streams", default="1,2,4")
    parser.add_argument("--batch", type=int, default=5000)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    schema = f"ceiling_{uuid.uuid4().hex[:8]}"
    bare = f"{schema}_nofk"
    admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
    dsn = admin.url.set(drivername="postgresql").render_as_string(hide_password=False)
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        conn.execute(text(f'CREATE SCHEMA "{bare}"'))
    try:
        db = CpDatabase.open(f"{args.pg_url}?options=-csearch_path%3D{schema}").unwrap()
        migrate.upgrade(db).unwrap()
        db.dispose()
        with admin.connect() as conn:
            for table in TABLES:
                conn.execute(text(f'CREATE TABLE "{bare}"."{table}" (LIKE "{schema}"."{table}" INCLUDING ALL)'))
        template = template_rows(args.pg_url, schema, args.batch)
        print(
            f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
            f"{args.batches} batches of {args.batch} conversations a stream, one COPY transaction a batch"
        )
        print(f"{'tables':<10}{'streams':>8}{'conv':>9}{'wall s':>9}{'conv/s':>10}{'rows/s':>10}{'PG CPU us/conv':>15}")
        best_pg, best_rate = float("inf"), 0.0
        variants = (("schema", schema, TABLES), ("no FK", bare, TABLES), ("bare", bare, ("conversations", "turns")))
        for label, target, tables in variants:
            rows = sum(PER_CONVERSATION[t] for t in tables)
            for n in (int(s) for s in args.streams.split(",")):
                wall, cpu = measure(dsn, target, template, tables, n, args.batches)
                conv = n * args.batches * args.batch
                if label == "schema":
                    best_pg = min(best_pg, cpu / conv)
                    best_rate = max(best_rate, conv / wall)
                print(
                    f"{label:<10}{n:>8}{conv:>9}{wall:>9.2f}{conv / wall:>10,.0f}{rows * conv / wall:>10,.0f}"
                    f"{cpu / conv * 1e6:>14.1f}"
                )
        print(
            "schema / no FK: a conversation, a turn, two provenance records and an idempotency key per conversation;"
            "\nbare: only the conversation and its turn, without foreign keys (no provenance, no idempotency key)"
            "\nPG CPU: the streams' backends (utime + stime, /proc)"
        )
        fts = fts_cpu_per_turn(load_rows(), args.batch, args.batches)
        cores = os.cpu_count() or 1
        print(f"\nFTS5 insert, CPU per turn: {fts * 1e6:.1f} us ({args.batches} x {args.batch} turns)")
        print(
            f"committed only (the index left behind) = {cores} cores / {best_pg * 1e6:.1f} us PG with the schema"
            f" = {cores / best_pg:,.0f} conversations/s at most; measured above: {best_rate:,.0f}/s"
        )
        print(
            f"sustained ceiling (committed and indexed) = {cores} cores / ({best_pg * 1e6:.1f} us PG with the "
            f"schema + {fts * 1e6:.1f} us FTS5) = {cores / (best_pg + fts):,.0f} conversations/s"
        )
        print("both before any datamesh code runs: no validation, hashing, saga, broker or AP write")
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            conn.execute(text(f'DROP SCHEMA "{bare}" CASCADE'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
