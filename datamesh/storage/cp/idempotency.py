"""Idempotency keys in the CP tier: ``pending`` while the first saga runs, then ``completed``.

A key row is inserted in the same transaction that creates the saga; the primary key
``(tenant, key)`` makes two concurrent first requests race on one row, and the loser's transaction
is re-run and sees the winner.  Compensation deletes the pending rows of its saga so the client
may retry.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import String, Table, and_, any_, bindparam, delete, select, text, update
from sqlalchemy import cast as cast_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from datamesh.models.tables import IdempotencyKey
from datamesh.storage.cp.sql import bulk_insert

KEYS = cast(Table, IdempotencyKey.__table__)
PENDING = "pending"
COMPLETED = "completed"
_CHUNK = 400


@dataclass(frozen=True, slots=True)
class KeyState:
    key: str
    request_sha256: str
    saga_id: str
    status: str
    conversation_id: str | None
    turn_id: str | None
    turn_seq: int | None


def lookup_many(conn: Connection, tenant: str, keys: Sequence[str]) -> dict[str, KeyState]:
    """The state of each of ``keys`` that exists (one ``= ANY(array)`` query on PostgreSQL)."""
    found: dict[str, KeyState] = {}
    unique = list(dict.fromkeys(keys))
    chunk_size = max(1, len(unique)) if conn.dialect.name == "postgresql" else _CHUNK
    for start in range(0, len(unique), chunk_size):
        chunk = unique[start : start + chunk_size]
        if conn.dialect.name == "postgresql":
            match = KEYS.c.key == any_(cast_(chunk, ARRAY(String)))
        else:
            match = KEYS.c.key.in_(chunk)
        rows = conn.execute(select(KEYS).where(KEYS.c.tenant == tenant, match))
        for r in rows:
            found[r.key] = KeyState(
                r.key, r.request_sha256, r.saga_id, r.status, r.conversation_id, r.turn_id, r.turn_seq
            )
    return found


def reserve_many(conn: Connection, tenant: str, saga_id: str, keys: Sequence[tuple[str, str]], now: datetime) -> None:
    """Insert ``(key, request_sha256)`` rows as pending for ``saga_id`` (a duplicate key raises)."""
    if keys:
        bulk_insert(
            conn,
            KEYS,
            [
                {
                    "tenant": tenant,
                    "key": key,
                    "request_sha256": digest,
                    "saga_id": saga_id,
                    "status": PENDING,
                    "created_at": now,
                    "updated_at": now,
                }
                for key, digest in keys
            ],
        )


_COMPLETE_PG = text(
    "UPDATE idempotency_keys AS k SET status = 'completed', conversation_id = v.c, turn_id = v.t,"
    " turn_seq = v.s, updated_at = :now"
    " FROM unnest(CAST(:keys AS varchar[]), CAST(:cids AS varchar[]), CAST(:tids AS varchar[]),"
    " CAST(:seqs AS integer[])) AS v(k, c, t, s)"
    " WHERE k.tenant = :tenant AND k.key = v.k AND k.saga_id = :saga"
)


def complete_many(
    conn: Connection, tenant: str, saga_id: str, results: Sequence[tuple[str, str, str, int]], now: datetime
) -> None:
    """Mark keys completed with ``(key, conversation_id, turn_id, turn_seq)``.

    PostgreSQL: one ``UPDATE ... FROM unnest(...)`` for the whole batch; SQLite: one executemany.
    """
    if not results:
        return
    if conn.dialect.name == "postgresql":
        conn.execute(
            _COMPLETE_PG,
            {
                "tenant": tenant,
                "saga": saga_id,
                "now": now,
                "keys": [r[0] for r in results],
                "cids": [r[1] for r in results],
                "tids": [r[2] for r in results],
                "seqs": [r[3] for r in results],
            },
        )
        return
    stmt = (
        update(KEYS)
        .where(and_(KEYS.c.tenant == tenant, KEYS.c.key == bindparam("k"), KEYS.c.saga_id == saga_id))
        .values(
            status=COMPLETED,
            conversation_id=bindparam("c"),
            turn_id=bindparam("t"),
            turn_seq=bindparam("s"),
            updated_at=now,
        )
    )
    conn.execute(stmt, [{"k": k, "c": c, "t": t, "s": s} for k, c, t, s in results])


def release(conn: Connection, saga_id: str) -> int:
    """Delete the pending keys of a compensated saga; returns how many."""
    result = conn.execute(delete(KEYS).where(KEYS.c.saga_id == saga_id, KEYS.c.status == PENDING))
    return result.rowcount
