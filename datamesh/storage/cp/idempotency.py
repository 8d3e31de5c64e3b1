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

from sqlalchemy import Table, and_, bindparam, delete, select, update
from sqlalchemy.engine import Connection

from datamesh.models.tables import IdempotencyKey

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
    found: dict[str, KeyState] = {}
    unique = list(dict.fromkeys(keys))
    for start in range(0, len(unique), _CHUNK):
        chunk = unique[start : start + _CHUNK]
        rows = conn.execute(select(KEYS).where(KEYS.c.tenant == tenant, KEYS.c.key.in_(chunk)))
        for r in rows:
            found[r.key] = KeyState(
                r.key, r.request_sha256, r.saga_id, r.status, r.conversation_id, r.turn_id, r.turn_seq
            )
    return found


def reserve_many(conn: Connection, tenant: str, saga_id: str, keys: Sequence[tuple[str, str]], now: datetime) -> None:
    """Insert ``(key, request_sha256)`` rows as pending for ``saga_id`` (a duplicate key raises)."""
    if keys:
        conn.execute(
            KEYS.insert(),
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


def complete_many(
    conn: Connection, tenant: str, saga_id: str, results: Sequence[tuple[str, str, str, int]], now: datetime
) -> None:
    """Mark keys completed with ``(key, conversation_id, turn_id, turn_seq)``."""
    if not results:
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
