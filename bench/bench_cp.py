"""CP tier write throughput on PostgreSQL: the saga's reserve and commit_cp next to raw COPY.

    python bench/bench_cp.py [--pg-url URL] [--batch-sizes 1000,10000] [--repeat 3]

For each batch size, real AlpacaEval turns (../shared/data, fresh entity ids, nothing deduplicated)
go through the pipeline's CP steps exactly as an ingest runs them: ``reserve`` (idempotency keys,
saga row, step record) and the ``commit_cp`` pivot (conversations, turns, two provenance records a
turn with their hash chain, idempotency keys completed, saga transition and step record), each one
serializable transaction.  Then the very rows those steps wrote are read back and loaded with raw
``COPY`` (psycopg2 ``copy_expert``, one transaction) into tables created ``LIKE ... INCLUDING ALL``
(same columns, primary keys, unique constraints and indexes) in another schema of the same server.
rows/s counts the rows each side writes; the ratio is pipeline rows/s over raw COPY rows/s.  Each
cell is the median of ``--repeat`` runs, in a fresh schema dropped at the end.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import create_engine, text

from datamesh.core.config import DataMeshConfig
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionRequest
from datamesh.pipeline.prepare import prepare
from datamesh.pipeline.request import validate
from datamesh.pipeline.steps import commit_cp, reserve
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import migrate
from datamesh.storage.cp.database import CpDatabase

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca_eval"
DEFAULT_PG_URL = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
TABLES = ("conversations", "turns", "provenance_records", "idempotency_keys")
#: per table, the rows one saga (``%(s)s``) wrote
ROWS_OF_SAGA = {
    "conversations": "id IN (SELECT conversation_id FROM turns WHERE saga_id = %(s)s)",
    "turns": "saga_id = %(s)s",
    "provenance_records": "conversation_id IN (SELECT conversation_id FROM turns WHERE saga_id = %(s)s)",
    "idempotency_keys": "saga_id = %(s)s",
}


def load_rows() -> list[tuple[bytes, bytes]]:
    rows: list[tuple[bytes, bytes]] = []
    for model in ("gpt4", "claude", "llama-2-70b-chat-hf"):
        for r in json.loads((DATA / f"{model}.json").read_text(encoding="utf-8")):
            rows.append((r["instruction"].encode(), r["output"].encode()))
    return rows


def requests_for(rows: list[tuple[bytes, bytes]], n: int, entities: int = 64) -> list[IngestionRequest]:
    owners = [EntityId.generate() for _ in range(entities)]
    return [
        IngestionRequest(
            entity_id=owners[i % entities],
            prompt=rows[i % len(rows)][0],
            response=rows[i % len(rows)][1],
            geo_region=GeoRegion.EU_WEST,
            idempotency_key=f"bench-{uuid.uuid4().hex}",
        )
        for i in range(n)
    ]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def copy_rows(raw: Any, schema: str, table: str, rows: list[tuple[Any, ...]], columns: list[str]) -> None:
    buffer = io.StringIO()
    for row in rows:
        buffer.write("\t".join(_copy_value(v) for v in row) + "\n")
    buffer.seek(0)
    cursor = raw.cursor()
    cursor.copy_expert(f'COPY "{schema}"."{table}" ({", ".join(columns)}) FROM STDIN', buffer)
    cursor.close()


def _copy_value(value: object) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if hasattr(value, "isoformat"):
        return value.isoformat()  # type: ignore[no-any-return]
    return str(value).replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def run_once(
    tiers: Tiers, url: str, schema: str, raw_schema: str, n: int, rows: list[tuple[bytes, bytes]]
) -> dict[str, float]:
    requests = requests_for(rows, n)
    prepared = [prepare(i, validate(r, max_payload_bytes=1 << 30).unwrap()) for i, r in enumerate(requests)]
    t_reserve, outcome = timed(lambda: reserve(tiers, "bench", prepared, shard_count=4).unwrap())
    plan = outcome.plan
    assert len(plan.items) == n, "nothing may be deduplicated"
    t_commit, done = timed(lambda: commit_cp(tiers, plan).unwrap())
    assert len(done) == n

    # the very rows the pipeline wrote, loaded with raw COPY into equivalent tables
    engine = create_engine(url)
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        data: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
        for table in TABLES:
            cursor.execute(f'SELECT * FROM "{schema}"."{table}" WHERE {ROWS_OF_SAGA[table]}', {"s": plan.saga_id})
            columns = [d.name for d in cursor.description]
            data[table] = (columns, cursor.fetchall())
        raw.commit()
        copy_times: dict[str, float] = {}
        for target in (raw_schema, f"{raw_schema}_fk"):
            started = time.perf_counter()
            for table in TABLES:
                columns, table_rows = data[table]
                copy_rows(raw, target, table, table_rows, columns)
            raw.commit()
            copy_times[target] = time.perf_counter() - started
        started = time.perf_counter()
        copy_rows(raw, raw_schema, "reserve_keys", data["idempotency_keys"][1], data["idempotency_keys"][0])
        raw.commit()
        t_copy_keys = time.perf_counter() - started
    finally:
        raw.close()
        engine.dispose()
    commit_rows = sum(len(data[t][1]) for t in TABLES)
    reserve_rows = len(data["idempotency_keys"][1])
    return {
        "commit_rows": commit_rows,
        "reserve_rows": reserve_rows,
        "t_commit": t_commit,
        "t_reserve": t_reserve,
        "t_copy": copy_times[raw_schema],
        "t_copy_fk": copy_times[f"{raw_schema}_fk"],
        "t_copy_keys": t_copy_keys,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pg-url", default=DEFAULT_PG_URL)
    parser.add_argument("--batch-sizes", default="1000,10000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    rows = load_rows()
    schema = f"bench_{uuid.uuid4().hex[:8]}"
    raw_schema = f"{schema}_raw"
    admin = create_engine(args.pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        conn.execute(text(f'CREATE SCHEMA "{raw_schema}"'))
        conn.execute(text(f'CREATE SCHEMA "{raw_schema}_fk"'))
    url = f"{args.pg_url}?options=-csearch_path%3D{schema}"
    try:
        db = CpDatabase.open(url).unwrap()
        migrate.upgrade(db).unwrap()
        db.dispose()
        with admin.connect() as conn:
            for target in (raw_schema, f"{raw_schema}_fk"):
                for table in TABLES:
                    conn.execute(text(f'CREATE TABLE "{target}"."{table}" (LIKE "{schema}"."{table}" INCLUDING ALL)'))
            for table in ("turns", "provenance_records"):  # the CP schema's foreign keys, in the _fk copy
                conn.execute(
                    text(
                        f'ALTER TABLE "{raw_schema}_fk"."{table}" ADD FOREIGN KEY (conversation_id)'
                        f' REFERENCES "{raw_schema}_fk".conversations (id)'
                    )
                )
            conn.execute(
                text(f'CREATE TABLE "{raw_schema}".reserve_keys (LIKE "{schema}".idempotency_keys INCLUDING ALL)')
            )
        config = DataMeshConfig(data_dir=Path("/tmp") / schema, cp_url=url)
        tiers = Tiers.open(config).unwrap()
        try:
            run_once(tiers, url, schema, raw_schema, 200, rows)  # warm-up: connections, caches
            print(f"PostgreSQL CP writes, median of {args.repeat} runs per cell (rows/s; higher is better)")
            print("raw COPY = same rows, same columns, keys and indexes; '+FK' adds the CP schema's foreign keys\n")
            header = f"{'step':<22}{'batch':>7}{'rows':>8}{'pipeline s':>11}{'rows/s':>9}"
            header += f"{'COPY s':>9}{'rows/s':>9}{'ratio':>7}{'COPY+FK s':>11}{'rows/s':>9}{'ratio':>7}"
            print(header)
            print("-" * len(header))
            for n in sizes:
                runs = [run_once(tiers, url, schema, raw_schema, n, rows) for _ in range(args.repeat)]

                def med(key: str, runs: list[dict[str, float]] = runs) -> float:
                    return statistics.median(r[key] for r in runs)

                lines = (
                    ("commit_cp (pivot)", med("commit_rows"), med("t_commit"), med("t_copy"), med("t_copy_fk")),
                    ("reserve", med("reserve_rows"), med("t_reserve"), med("t_copy_keys"), med("t_copy_keys")),
                    (
                        "reserve + commit_cp",
                        med("commit_rows") + med("reserve_rows"),
                        med("t_commit") + med("t_reserve"),
                        med("t_copy") + med("t_copy_keys"),
                        med("t_copy_fk") + med("t_copy_keys"),
                    ),
                )
                for label, count, t_pipe, t_raw, t_fk in lines:
                    print(
                        f"{label:<22}{n:>7}{int(count):>8}{t_pipe:>11.3f}{count / t_pipe:>9,.0f}"
                        f"{t_raw:>9.3f}{count / t_raw:>9,.0f}{t_raw / t_pipe:>7.0%}"
                        f"{t_fk:>11.3f}{count / t_fk:>9,.0f}{t_fk / t_pipe:>7.0%}"
                    )
            print(
                "\ncommit_cp rows = conversations + turns + provenance records (2 a turn) + idempotency keys "
                "completed;\nreserve rows = idempotency keys inserted (the pipeline also writes the saga row with its "
                "plan and a step record, not counted).\nratio = pipeline rows/s / raw COPY rows/s (target >= 50%)."
            )
        finally:
            tiers.close()
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
            conn.execute(text(f'DROP SCHEMA "{raw_schema}" CASCADE'))
            conn.execute(text(f'DROP SCHEMA "{raw_schema}_fk" CASCADE'))
        admin.dispose()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
