"""References from sagas to object-store blobs, and the locked collection of unreferenced blobs.

A saga records its references *before* it writes its blobs.  A compensation only drops its
references; garbage collection deletes a blob left with none once it is older than the grace
period.  Counting a blob's references and deleting it happen while the blob's CP row is locked (``FOR UPDATE`` on
PostgreSQL; SQLite serialises writers), so a saga adding a reference to the same content either
runs before (the blob stays) or after (its own put writes the blob again).  A blob is therefore
never deleted while a committed row or a saga in flight references it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import cast

from sqlalchemy import Table, delete, func, select
from sqlalchemy.engine import Connection

from datamesh.models.tables import Blob, ObjectRef
from datamesh.storage.cp.sql import insert_ignore, utcnow

BLOBS = cast(Table, Blob.__table__)
REFS = cast(Table, ObjectRef.__table__)


def add_refs(conn: Connection, saga_id: str, blobs: Sequence[tuple[str, str, int]], now: datetime) -> None:
    """Reference ``(region, content_hash, size)`` blobs from ``saga_id`` (idempotent)."""
    if not blobs:
        return
    insert_ignore(
        conn,
        BLOBS,
        [{"region": r, "content_hash": h, "size": s, "created_at": now} for r, h, s in blobs],
        ["region", "content_hash"],
    )
    _lock(conn, [(r, h) for r, h, _ in blobs])
    insert_ignore(
        conn,
        REFS,
        [{"region": r, "content_hash": h, "saga_id": saga_id, "created_at": now} for r, h, _ in blobs],
        ["region", "content_hash", "saga_id"],
    )


def drop_refs(conn: Connection, saga_id: str, *, region: str | None = None) -> list[tuple[str, str]]:
    """Drop every reference of ``saga_id`` (in ``region`` only, if given); return the blobs left with
    none.

    Their objects stay where they are: garbage collection deletes them once they are older than its
    grace period (:func:`collect`).  Their CP rows, which only anchor the row lock, go now; a
    collection or a new reference makes one again.
    """
    where = [REFS.c.saga_id == saga_id] + ([REFS.c.region == region] if region is not None else [])
    refs = [(r.region, r.content_hash) for r in conn.execute(select(REFS).where(*where))]
    if not refs:
        return []
    _lock(conn, refs)
    conn.execute(delete(REFS).where(*where))
    return forget_unreferenced(conn, refs)


def forget_unreferenced(conn: Connection, candidates: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    """Delete the CP row of each candidate blob no reference holds (its object is left to GC)."""
    return _drop_unreferenced(conn, candidates, _keep_object)


def collect(
    conn: Connection, candidates: Sequence[tuple[str, str]], delete_blob: Callable[[str, str], None]
) -> list[tuple[str, str]]:
    """Delete each candidate blob that no reference holds, with its row locked.

    On PostgreSQL the candidate's row is created if missing, so there is always a row to lock: a
    saga adding a reference to the same content waits for this transaction, then writes the blob
    anew.  (SQLite serialises writers, which gives the same guarantee.)
    """
    if conn.dialect.name == "postgresql" and candidates:
        insert_ignore(
            conn,
            BLOBS,
            [{"region": r, "content_hash": h, "size": 0, "created_at": utcnow()} for r, h in sorted(set(candidates))],
            ["region", "content_hash"],
        )
    return _drop_unreferenced(conn, candidates, delete_blob)


def referenced(conn: Connection, region: str, hashes: Sequence[str]) -> set[str]:
    """Which of ``hashes`` some saga (committed or in flight) still references in ``region``."""
    found: set[str] = set()
    for start in range(0, len(hashes), 400):
        chunk = list(hashes[start : start + 400])
        rows = conn.execute(
            select(REFS.c.content_hash).where(REFS.c.region == region, REFS.c.content_hash.in_(chunk)).distinct()
        )
        found.update(r.content_hash for r in rows)
    return found


def committed_hashes(conn: Connection, region: str) -> set[str]:
    """Blobs of ``region`` that committed conversations reference (what a scrub expects to find)."""
    from datamesh.models.tables import Saga

    sagas_table = cast(Table, Saga.__table__)
    rows = conn.execute(
        select(REFS.c.content_hash)
        .join(sagas_table, sagas_table.c.id == REFS.c.saga_id)
        .where(REFS.c.region == region, sagas_table.c.status == "committed")
        .distinct()
    )
    return {r.content_hash for r in rows}


def _drop_unreferenced(
    conn: Connection, candidates: Sequence[tuple[str, str]], delete_blob: Callable[[str, str], None]
) -> list[tuple[str, str]]:
    """With each candidate's row locked: for those no reference holds, ``delete_blob`` then the row."""
    _lock(conn, candidates)
    dropped: list[tuple[str, str]] = []
    for region, content_hash in sorted(set(candidates)):
        if _references(conn, region, content_hash) == 0:
            delete_blob(region, content_hash)
            conn.execute(delete(BLOBS).where(BLOBS.c.region == region, BLOBS.c.content_hash == content_hash))
            dropped.append((region, content_hash))
    return dropped


def _keep_object(region: str, content_hash: str) -> None:
    """The object of a blob whose last reference a compensation dropped: GC's, after its grace period."""


def _references(conn: Connection, region: str, content_hash: str) -> int:
    return int(
        conn.execute(
            select(func.count()).select_from(REFS).where(REFS.c.region == region, REFS.c.content_hash == content_hash)
        ).scalar_one()
    )


def _lock(conn: Connection, keys: Sequence[tuple[str, str]]) -> None:
    if conn.dialect.name != "postgresql" or not keys:
        return  # SQLite: BEGIN IMMEDIATE already holds the database's write lock
    for region, content_hash in sorted(set(keys)):  # a fixed order avoids deadlocks between lockers
        conn.execute(
            select(BLOBS.c.content_hash)
            .where(BLOBS.c.region == region, BLOBS.c.content_hash == content_hash)
            .with_for_update()
        )


def drop_turn_refs(
    conn: Connection, refs: Sequence[tuple[str, str, str]], delete_blob: Callable[[str, str], None]
) -> list[tuple[str, str]]:
    """Drop the ``(region, content_hash, saga_id)`` references; delete blobs left with none.

    Used by erasure: the caller passes only references no remaining turn of the saga needs.
    """
    if not refs:
        return []
    keys = sorted({(r, h) for r, h, _ in refs})
    _lock(conn, keys)
    for region, content_hash, saga_id in sorted(set(refs)):
        conn.execute(
            delete(REFS).where(REFS.c.region == region, REFS.c.content_hash == content_hash, REFS.c.saga_id == saga_id)
        )
    return collect(conn, keys, delete_blob)
