"""The index outbox: index work owed after a CP commit, written in that commit's transaction.

Rows are claimed by pushing ``next_attempt_at`` past a lease (a crashed indexer's rows come due
again), deleted when their work is done, and pushed back with the error when it fails.  Ops:

* ``add``: index the turns that saga ``key`` committed in ``region``;
* ``erase_conversation`` / ``erase_entity``: delete the AP content and index entries of
  conversation / entity ``key`` in ``region`` (written by erasure).  Under Celery the index worker
  removes the index entries and hands the AP deletes to the shard's owner, which deletes the row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import cast

from sqlalchemy import Table, case, delete, func, select, update
from sqlalchemy.engine import Connection

from datamesh.models.tables import IndexOutbox
from datamesh.storage.cp.sql import as_utc

OUTBOX = cast(Table, IndexOutbox.__table__)

ADD = "add"
ERASE_CONVERSATION = "erase_conversation"
ERASE_ENTITY = "erase_entity"
_MAX_ERROR_CHARS = 2000


@dataclass(frozen=True, slots=True)
class OutboxRow:
    id: int
    op: str
    key: str
    region: str
    tenant: str
    attempts: int
    enqueued_at: datetime


@dataclass(frozen=True, slots=True)
class RegionDepth:
    """Rows owed in one region and the enqueue time of the oldest."""

    rows: int
    oldest: datetime | None
    failing: int


def enqueue(conn: Connection, rows: Sequence[tuple[str, str, str, str]], now: datetime) -> None:
    """Insert ``(op, key, region, tenant)`` rows, due at once."""
    if not rows:
        return
    conn.execute(
        OUTBOX.insert(),
        [
            {
                "op": op,
                "key": key,
                "region": region,
                "tenant": tenant,
                "attempts": 0,
                "last_error": None,
                "enqueued_at": now,
                "next_attempt_at": now,
            }
            for op, key, region, tenant in rows
        ],
    )


def any_due(conn: Connection, now: datetime, regions: Sequence[str] | None = None) -> bool:
    """Whether some row is due (a read, so an idle indexer takes no write lock)."""
    query = select(OUTBOX.c.id).where(OUTBOX.c.next_attempt_at <= now)
    if regions is not None:
        query = query.where(OUTBOX.c.region.in_(list(regions)))
    return conn.execute(query.limit(1)).first() is not None


def claim(
    conn: Connection,
    now: datetime,
    *,
    limit: int,
    lease_s: float,
    regions: Sequence[str] | None = None,
    due_only: bool = True,
) -> list[OutboxRow]:
    """Take up to ``limit`` due rows, oldest first, and lease them for ``lease_s`` seconds."""
    query = select(OUTBOX).order_by(OUTBOX.c.id).limit(limit)
    if due_only:
        query = query.where(OUTBOX.c.next_attempt_at <= now)
    if regions is not None:
        query = query.where(OUTBOX.c.region.in_(list(regions)))
    rows = [
        OutboxRow(r.id, r.op, r.key, r.region, r.tenant, r.attempts, as_utc(r.enqueued_at)) for r in conn.execute(query)
    ]
    if rows:
        conn.execute(
            update(OUTBOX)
            .where(OUTBOX.c.id.in_([r.id for r in rows]))
            .values(next_attempt_at=now + timedelta(seconds=lease_s))
        )
    return rows


def get(conn: Connection, row_id: int) -> OutboxRow | None:
    r = conn.execute(select(OUTBOX).where(OUTBOX.c.id == row_id)).first()
    return None if r is None else OutboxRow(r.id, r.op, r.key, r.region, r.tenant, r.attempts, as_utc(r.enqueued_at))


def complete(conn: Connection, ids: Sequence[int]) -> None:
    if ids:
        conn.execute(delete(OUTBOX).where(OUTBOX.c.id.in_(list(ids))))


def fail(conn: Connection, ids: Sequence[int], error: str, next_attempt_at: datetime) -> None:
    """Record a failed attempt; the rows come due again at ``next_attempt_at``."""
    if ids:
        conn.execute(
            update(OUTBOX)
            .where(OUTBOX.c.id.in_(list(ids)))
            .values(
                attempts=OUTBOX.c.attempts + 1,
                last_error=error[:_MAX_ERROR_CHARS],
                next_attempt_at=next_attempt_at,
            )
        )


def depth(conn: Connection) -> dict[str, RegionDepth]:
    """Rows owed per region, with the oldest enqueue time and how many have failed at least once."""
    rows = conn.execute(
        select(
            OUTBOX.c.region,
            func.count().label("n"),
            func.min(OUTBOX.c.enqueued_at).label("oldest"),
            func.sum(case((OUTBOX.c.attempts > 0, 1), else_=0)).label("failing"),
        ).group_by(OUTBOX.c.region)
    )
    return {
        r.region: RegionDepth(int(r.n), None if r.oldest is None else as_utc(r.oldest), int(r.failing or 0))
        for r in rows
    }


def last_errors(conn: Connection, limit: int = 5) -> list[tuple[str, str, int, str]]:
    """The oldest rows that failed at least once: ``(op, key, attempts, last_error)``."""
    rows = conn.execute(select(OUTBOX).where(OUTBOX.c.attempts > 0).order_by(OUTBOX.c.id).limit(limit))
    return [(r.op, r.key, r.attempts, r.last_error or "") for r in rows]
