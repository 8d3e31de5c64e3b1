"""Conversations and turns in the CP tier: the pivot's writes and the read path's lookups."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, NamedTuple, cast

from sqlalchemy import String, Table, any_, bindparam, select, text, update
from sqlalchemy import cast as cast_
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.engine import Connection

from datamesh.models.tables import Conversation, Turn
from datamesh.storage.cp.sql import as_utc, bulk_insert

CONVERSATIONS = cast(Table, Conversation.__table__)
TURNS = cast(Table, Turn.__table__)
ACTIVE = "active"
ERASED = "erased"


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


class IndexSource(NamedTuple):
    """What the indexer needs of one committed turn: ids, content hashes and time, and its
    conversation's access fields and status (a tuple: one is made per turn indexed)."""

    conversation_id: str
    turn_id: str
    prompt_sha256: str
    response_sha256: str
    created_at: datetime
    tenant: str
    entity_id: str
    region: str
    status: str

    @classmethod
    def of(cls, turn: TurnRow, conversation: ConversationRow) -> IndexSource:
        return cls(
            turn.conversation_id,
            turn.turn_id,
            turn.prompt_sha256,
            turn.response_sha256,
            turn.created_at,
            conversation.tenant,
            conversation.entity_id,
            conversation.region,
            conversation.status,
        )


def get_many(conn: Connection, ids: Sequence[str]) -> dict[str, ConversationRow]:
    """Conversations by id: one ``= ANY(array)`` query on PostgreSQL, chunks of ``IN`` on SQLite."""
    found: dict[str, ConversationRow] = {}
    unique = list(dict.fromkeys(ids))
    if not unique:
        return found
    if conn.dialect.name == "postgresql":
        chunks = [select(CONVERSATIONS).where(CONVERSATIONS.c.id == any_(cast_(unique, ARRAY(String))))]
    else:
        chunks = [
            select(CONVERSATIONS).where(CONVERSATIONS.c.id.in_(unique[start : start + 400]))
            for start in range(0, len(unique), 400)
        ]
    for query in chunks:
        for r in conn.execute(query):
            found[r.id] = _conversation(r)
    return found


_NOT_ACTIVE_PG = text(
    "SELECT v.id FROM unnest(CAST(:ids AS varchar[])) AS v(id)"
    " LEFT JOIN conversations AS c ON c.id = v.id WHERE c.id IS NULL OR c.status <> :active"
)


def not_active(conn: Connection, ids: Sequence[str]) -> set[str]:
    """Those of ``ids`` that are not an active conversation (erased, or absent).

    The indexer's re-check after indexing: usually none, so PostgreSQL answers with the few ids
    concerned only, not a row per conversation; SQLite returns the active ids, in chunks.
    """
    unique = list(dict.fromkeys(ids))
    if not unique:
        return set()
    if conn.dialect.name == "postgresql":
        return {r[0] for r in conn.execute(_NOT_ACTIVE_PG, {"ids": unique, "active": ACTIVE})}
    active: set[str] = set()
    for start in range(0, len(unique), 400):
        query = select(CONVERSATIONS.c.id).where(
            CONVERSATIONS.c.id.in_(unique[start : start + 400]), CONVERSATIONS.c.status == ACTIVE
        )
        active.update(r[0] for r in conn.execute(query))
    return set(unique) - active


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


def index_sources_of_saga(conn: Connection, saga_id: str) -> list[IndexSource]:
    """The turns a saga committed, with their conversations' access fields: one query, the columns
    the indexer uses only (no metadata, sizes or locations decoded per turn)."""
    query = (
        select(
            TURNS.c.conversation_id,
            TURNS.c.turn_id,
            TURNS.c.prompt_sha256,
            TURNS.c.response_sha256,
            TURNS.c.created_at,
            CONVERSATIONS.c.tenant,
            CONVERSATIONS.c.entity_id,
            CONVERSATIONS.c.region,
            CONVERSATIONS.c.status,
        )
        .join(CONVERSATIONS, CONVERSATIONS.c.id == TURNS.c.conversation_id)
        .where(TURNS.c.saga_id == saga_id)
    )
    return [
        IndexSource(cid, tid, ps, rs, as_utc(at), tenant, entity, region, status)
        for cid, tid, ps, rs, at, tenant, entity, region, status in conn.execute(query)
    ]


def seqs_of_saga(conn: Connection, saga_id: str) -> dict[str, int]:
    """``turn_id → seq`` of the turns a saga committed (what its caller is answered; two columns only)."""
    rows = conn.execute(select(TURNS.c.turn_id, TURNS.c.seq).where(TURNS.c.saga_id == saga_id))
    return {turn_id: seq for turn_id, seq in rows}


def turns_by_ids(conn: Connection, turn_ids: Sequence[str]) -> dict[str, tuple[TurnRow, ConversationRow]]:
    """Turns by turn id, each with its conversation (the search path's CP lookup)."""
    found: dict[str, tuple[TurnRow, ConversationRow]] = {}
    unique = list(dict.fromkeys(turn_ids))
    for start in range(0, len(unique), 400):
        rows = conn.execute(
            select(TURNS, *[c.label(f"c_{c.name}") for c in CONVERSATIONS.c])
            .join(CONVERSATIONS, CONVERSATIONS.c.id == TURNS.c.conversation_id)
            .where(TURNS.c.turn_id.in_(unique[start : start + 400]))
        )
        for r in rows:
            conversation = ConversationRow(
                r.c_id,
                r.c_tenant,
                r.c_entity_id,
                r.c_region,
                r.c_status,
                r.c_turn_count,
                as_utc(r.c_created_at),
                as_utc(r.c_updated_at),
            )
            found[r.turn_id] = (_turn(r), conversation)
    return found


def page_in_region(
    conn: Connection, region: str, *, after: str = "", limit: int = 500, status: str = ACTIVE
) -> list[ConversationRow]:
    """Conversations of ``region`` with ``status``, by id after ``after`` (keyset pagination)."""
    rows = conn.execute(
        select(CONVERSATIONS)
        .where(CONVERSATIONS.c.region == region, CONVERSATIONS.c.status == status, CONVERSATIONS.c.id > after)
        .order_by(CONVERSATIONS.c.id)
        .limit(limit)
    )
    return [_conversation(r) for r in rows]


def turns_of_many(conn: Connection, conversation_ids: Sequence[str]) -> list[TurnRow]:
    """Every turn of these conversations, by conversation then sequence."""
    out: list[TurnRow] = []
    unique = list(dict.fromkeys(conversation_ids))
    for start in range(0, len(unique), 400):
        rows = conn.execute(
            select(TURNS)
            .where(TURNS.c.conversation_id.in_(unique[start : start + 400]))
            .order_by(TURNS.c.conversation_id, TURNS.c.seq)
        )
        out.extend(_turn(r) for r in rows)
    return out


def of_entity(conn: Connection, tenant: str, entity_id: str, *, status: str | None = ACTIVE) -> list[ConversationRow]:
    """Conversations of one entity of ``tenant`` (uses ``ix_conversations_tenant_entity``)."""
    query = select(CONVERSATIONS).where(CONVERSATIONS.c.tenant == tenant, CONVERSATIONS.c.entity_id == entity_id)
    if status is not None:
        query = query.where(CONVERSATIONS.c.status == status)
    return [_conversation(r) for r in conn.execute(query.order_by(CONVERSATIONS.c.id))]


def mark(conn: Connection, conversation_ids: Sequence[str], status: str, now: datetime) -> None:
    """Set the status of these conversations (e.g. to :data:`ERASED`)."""
    unique = sorted(set(conversation_ids))
    for start in range(0, len(unique), 400):
        conn.execute(
            update(CONVERSATIONS)
            .where(CONVERSATIONS.c.id.in_(unique[start : start + 400]))
            .values(status=status, updated_at=now)
        )


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
