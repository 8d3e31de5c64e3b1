"""Conversations and turns in the CP tier: the pivot's writes and the read path's lookups."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, bindparam, select, text, update
from sqlalchemy.engine import Connection

from datamesh.models.tables import Conversation, Turn
from datamesh.storage.cp.sql import as_utc, bulk_insert

CONVERSATIONS = cast(Table, Conversation.__table__)
TURNS = cast(Table, Turn.__table__)
ACTIVE = "active"


@dataclass(frozen=True, slots=True)
class ConversationRow:
    id: str
    tenant: str
    entity_id: str
    region: str
    status: str
    turn_count: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class TurnRow:
    conversation_id: str
    seq: int
    turn_id: str
    saga_id: str
    prompt_sha256: str
    prompt_size: int
    prompt_location: str
    response_sha256: str
    response_size: int
    response_location: str
    ap_shard: int
    has_embedding: bool
    metadata: dict[str, str]
    created_at: datetime


def get_many(conn: Connection, ids: Sequence[str]) -> dict[str, ConversationRow]:
    found: dict[str, ConversationRow] = {}
    unique = list(dict.fromkeys(ids))
    for start in range(0, len(unique), 400):
        rows = conn.execute(select(CONVERSATIONS).where(CONVERSATIONS.c.id.in_(unique[start : start + 400])))
        for r in rows:
            found[r.id] = _conversation(r)
    return found


def insert_conversations(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    bulk_insert(conn, CONVERSATIONS, rows)


_SET_COUNTS_PG = text(
    "UPDATE conversations AS c SET turn_count = v.n, updated_at = :now"
    " FROM unnest(CAST(:ids AS varchar[]), CAST(:ns AS integer[])) AS v(id, n) WHERE c.id = v.id"
)


def set_turn_counts(conn: Connection, counts: dict[str, int], now: datetime) -> None:
    """Set each conversation's turn count: one ``UPDATE ... FROM unnest(...)`` on PostgreSQL."""
    if not counts:
        return
    ordered = sorted(counts.items())  # a fixed lock order keeps concurrent writers from deadlocking
    if conn.dialect.name == "postgresql":
        conn.execute(_SET_COUNTS_PG, {"ids": [c for c, _ in ordered], "ns": [n for _, n in ordered], "now": now})
        return
    conn.execute(
        update(CONVERSATIONS)
        .where(CONVERSATIONS.c.id == bindparam("cid"))
        .values(turn_count=bindparam("n"), updated_at=now),
        [{"cid": cid, "n": n} for cid, n in ordered],
    )


def insert_turns(conn: Connection, rows: Sequence[dict[str, Any]]) -> None:
    bulk_insert(conn, TURNS, rows)


def turns_of(conn: Connection, conversation_id: str) -> list[TurnRow]:
    rows = conn.execute(select(TURNS).where(TURNS.c.conversation_id == conversation_id).order_by(TURNS.c.seq))
    return [_turn(r) for r in rows]


def turns_of_saga(conn: Connection, saga_id: str) -> list[TurnRow]:
    return [_turn(r) for r in conn.execute(select(TURNS).where(TURNS.c.saga_id == saga_id))]


def count(conn: Connection) -> int:
    from sqlalchemy import func

    return int(conn.execute(select(func.count()).select_from(CONVERSATIONS)).scalar_one())


def _conversation(r: Any) -> ConversationRow:
    return ConversationRow(
        r.id, r.tenant, r.entity_id, r.region, r.status, r.turn_count, as_utc(r.created_at), as_utc(r.updated_at)
    )


def _turn(r: Any) -> TurnRow:
    return TurnRow(
        r.conversation_id,
        r.seq,
        r.turn_id,
        r.saga_id,
        r.prompt_sha256,
        r.prompt_size,
        r.prompt_location,
        r.response_sha256,
        r.response_size,
        r.response_location,
        r.ap_shard,
        bool(r.has_embedding),
        json.loads(r.metadata_json) if r.metadata_json else {},
        as_utc(r.created_at),
    )
