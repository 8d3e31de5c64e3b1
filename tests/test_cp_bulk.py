"""``bulk_insert``: what COPY stores on PostgreSQL is what ``INSERT`` would have stored.

The rows are formatted column by column (a repeated value once, a column of plain ids as is), so
the test mixes every shape a column can take: one repeated value, text needing COPY escapes next
to text that does not, NULLs among strings, integers, booleans and timestamps.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import Table, select

from datamesh.models.tables import Turn
from datamesh.storage.cp.database import CpDatabase
from datamesh.storage.cp.sql import bulk_insert

TURNS = cast(Table, Turn.__table__)


def _rows(now: datetime) -> list[dict[str, Any]]:
    tricky = ["plain", "tab\there", "new\nline", "back\\slash", "cr\rlf", "\\N", "üñí©ødé", ""]
    rows = []
    for n, meta in enumerate([*tricky, None, None]):
        rows.append(
            {
                "conversation_id": f"00000000-0000-7000-8000-{n:012d}",
                "seq": n,
                "turn_id": f"10000000-0000-7000-8000-{n:012d}",
                "saga_id": "20000000-0000-7000-8000-000000000000",  # one value repeated
                "prompt_sha256": f"{n:064x}",
                "prompt_size": 10**12 + n,
                "prompt_location": "ap" if n % 2 else "objects",
                "response_sha256": f"{n + 1:064x}",
                "response_size": n,
                "response_location": "ap",
                "ap_shard": n % 3,
                "has_embedding": n % 2 == 0,
                "metadata_json": meta,
                "created_at": now if n % 3 else now + timedelta(seconds=n),
            }
        )
    return rows


def test_copy_stores_every_value_as_given(pg_cp_url: str) -> None:
    # Given turn rows whose columns take every shape (the FK is deferred by inserting conversations)
    db = CpDatabase.open(pg_cp_url).unwrap()
    now = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    rows = _rows(now)

    def tx(conn: Any) -> list[dict[str, Any]]:
        conn.exec_driver_sql("SET CONSTRAINTS ALL DEFERRED")
        conn.exec_driver_sql("ALTER TABLE turns DROP CONSTRAINT IF EXISTS fk_turns_conversation_id_conversations")
        # When they are bulk-inserted
        bulk_insert(conn, TURNS, rows)
        return [dict(r._mapping) for r in conn.execute(select(TURNS).order_by(TURNS.c.seq))]

    stored = db.run(tx, operation="test.bulk").unwrap()
    db.dispose()
    # Then every value reads back exactly as given
    assert stored == rows
