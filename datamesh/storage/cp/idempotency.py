"""Idempotency keys in the CP tier: ``pending`` while the first saga runs, then ``completed``.

A key row is inserted in the same transaction that creates the saga; the primary key
``(tenant, key)`` makes two concurrent first requests race on one row, and the loser's transaction
is re-run and sees the winner.  Compensation deletes the pending rows of its saga so the client
may retry.

The row is written once, at ``reserve``, with the conversation and turn ids the plan chose; the pivot
does not update it.  A key is completed exactly when its saga is: :func:`lookup_many` reads the
saga's status and the turn's ``seq`` beside the key (both written by the pivot's one transaction, so
they cannot disagree with each other).  This saves the pivot an ``UPDATE`` of every key of the batch
(a new version of each row and of its index entries: ~12 µs of PostgreSQL CPU per turn, measured with
``bench/bench_conv_cpu.py``).  Rows written ``completed`` by earlier versions read as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import String, Table, any_, delete, select
from sqlalchemy import cast as cast_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from datamesh.models.tables import IdempotencyKey, Saga, Turn
from datamesh.storage.cp.sagas import SagaStatus
from datamesh.storage.cp.sql import bulk_insert

KEYS = cast(Table, IdempotencyKey.__table__)
SAGAS = cast(Table, Saga.__table__)
TURNS = cast(Table, Turn.__table__)
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


def serialize_reservations(conn: Connection) -> None:
    """Make this transaction's reservation wait for any other one still open (PostgreSQL only).

    A reservation reads its batch's keys, then inserts the new ones.  Two such transactions at once
    are the textbook serializable conflict: each read index pages the other writes into, so under
    SERIALIZABLE one of them is aborted at commit after doing all its work (measured: most
    concurrent 5,000-key reservations were).  ``LOCK TABLE`` as the transaction's first statement
    queues them instead; the transaction's snapshot is taken after the lock is granted (PostgreSQL
    takes it at the first query, and ``LOCK`` is not one), so a reservation sees every key the one
    before it committed, and the two do not overlap at all as far as the serializable checks go.
    ``SHARE ROW EXCLUSIVE`` conflicts with itself and with writers (a compensation deleting its
    keys waits a moment) but not with readers.  SQLite serializes writers already (``BEGIN IMMEDIATE``).
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(f'LOCK TABLE "{KEYS.name}" IN SHARE ROW EXCLUSIVE MODE')


def lookup_many(conn: Connection, tenant: str, keys: Sequence[str]) -> dict[str, KeyState]:
    """The state of each of ``keys`` that exists (one ``= ANY(array)`` query on PostgreSQL).

    A key is ``completed`` when its row says so (written by earlier versions) or its saga has
    committed; its ``turn_seq`` is then the committed turn's.  Otherwise it is ``pending``.
    """
    found: dict[str, KeyState] = {}
    unique = list(dict.fromkeys(keys))
    chunk_size = max(1, len(unique)) if conn.dialect.name == "postgresql" else _CHUNK
    for start in range(0, len(unique), chunk_size):
        chunk = unique[start : start + chunk_size]
        if conn.dialect.name == "postgresql":
            match = KEYS.c.key == any_(cast_(chunk, ARRAY(String)))
        else:
            match = KEYS.c.key.in_(chunk)
        query = (
            select(KEYS, SAGAS.c.status.label("saga_status"), TURNS.c.seq.label("committed_seq"))
            .select_from(
                KEYS.outerjoin(SAGAS, SAGAS.c.id == KEYS.c.saga_id).outerjoin(TURNS, TURNS.c.turn_id == KEYS.c.turn_id)
            )
            .where(KEYS.c.tenant == tenant, match)
        )
        for r in conn.execute(query):
            if r.status != COMPLETED and r.saga_status == SagaStatus.COMMITTED and r.committed_seq is not None:
                found[r.key] = KeyState(
                    r.key, r.request_sha256, r.saga_id, COMPLETED, r.conversation_id, r.turn_id, r.committed_seq
                )
            else:
                found[r.key] = KeyState(
                    r.key, r.request_sha256, r.saga_id, r.status, r.conversation_id, r.turn_id, r.turn_seq
                )
    return found


def reserve_many(
    conn: Connection, tenant: str, saga_id: str, keys: Sequence[tuple[str, str, str, str]], now: datetime
) -> None:
    """Insert ``(key, request_sha256, conversation_id, turn_id)`` rows for ``saga_id`` (a duplicate key raises).

    The row is final: it reads as completed once the saga commits (see the module docstring).
    """
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
                    "conversation_id": conversation_id,
                    "turn_id": turn_id,
                    "created_at": now,
                    "updated_at": now,
                }
                for key, digest, conversation_id, turn_id in keys
            ],
        )


def release(conn: Connection, saga_id: str) -> int:
    """Delete the pending keys of a compensated saga; returns how many.

    A committed saga's keys are never released, though they read ``pending`` in the table: the
    pivot no longer marks them (a committed saga is never compensated; this is the second guard).
    """
    committed = select(SAGAS.c.id).where(SAGAS.c.id == saga_id, SAGAS.c.status == SagaStatus.COMMITTED.value).exists()
    result = conn.execute(delete(KEYS).where(KEYS.c.saga_id == saga_id, KEYS.c.status == PENDING, ~committed))
    return result.rowcount
