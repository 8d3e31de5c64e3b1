"""Provenance chains: an append-only, hash-linked list of events per conversation.

Each record's hash is SHA-256 over a canonical encoding of (conversation id, sequence number,
kind, body, previous hash); the first record links to :data:`GENESIS`.  The unique constraints on
``(conversation_id, seq)`` and ``(conversation_id, prev_hash)`` — under serializable transactions —
mean two concurrent appends can never fork a chain: one of them fails and is re-run.  On
PostgreSQL an append first updates the conversation's row (:func:`lock_chains`), so concurrent
appenders queue behind one another and each loser fails with a serialization error (re-run by
:meth:`CpDatabase.run` on the new head) rather than a constraint violation.

Events, each a :class:`ProvenanceKind` with a JSON body:

* ``turn_ingested`` (content hashes and sizes) and ``content_stored`` (tier, location): written by
  the saga's pivot;
* ``derived_artifact`` (e.g. an embedding, with its model): :func:`derived_artifact`;
* ``access_granted`` / ``access_revoked`` (subject, role): :func:`access_change`;
* ``redacted`` / ``erased`` (which turns, why): :func:`redaction`.

Append any of them with :func:`append` (one event) or :func:`append_many` (a batch).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Table, func, select, text
from sqlalchemy.engine import Connection

from datamesh.core.principal import Principal
from datamesh.models.tables import Conversation, ProvenanceRecord
from datamesh.storage.cp.sql import bulk_insert

RECORDS = cast(Table, ProvenanceRecord.__table__)
CONVERSATIONS = cast(Table, Conversation.__table__)
GENESIS = "0" * 64


class ProvenanceKind(StrEnum):
    TURN_INGESTED = "turn_ingested"
    CONTENT_STORED = "content_stored"
    DERIVED_ARTIFACT = "derived_artifact"
    ACCESS_GRANTED = "access_granted"
    ACCESS_REVOKED = "access_revoked"
    REDACTED = "redacted"
    ERASED = "erased"


@dataclass(frozen=True, slots=True)
class ChainBreak:
    """The first record whose stored hash or link does not match what is recomputed."""

    conversation_id: str
    seq: int
    expected: str
    actual: str
    reason: str


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False)
_string = json.encoder.encode_basestring


def canonical(body: Mapping[str, Any]) -> str:
    """Sorted keys, no spaces, UTF-8 as is: ``json.dumps(body, sort_keys=True, ...)``."""
    return _CANONICAL.encode(body)


def chain_hash(conversation_id: str, seq: int, kind: str, body_json: str, prev_hash: str) -> str:
    """SHA-256 of ``canonical({"c": id, "s": seq, "k": kind, "b": body_json, "p": prev_hash})``.

    Spelled out by hand (keys in sorted order) because it runs twice per turn on the ingest path;
    a test checks it against the ``canonical`` form.
    """
    encoded = '{"b":%s,"c":%s,"k":%s,"p":%s,"s":%d}' % (  # noqa: UP031 - fixed layout, hashed
        _string(body_json),
        _string(conversation_id),
        _string(kind),
        _string(prev_hash),
        seq,
    )
    return hashlib.sha256(encoded.encode()).hexdigest()


_TURN_INGESTED = (
    '{"prompt_sha256":%s,"prompt_size":%d,"response_sha256":%s,"response_size":%d,'
    '"saga_id":%s,"turn_id":%s,"turn_seq":%d}'
)
_CONTENT_STORED = (
    '{"embedding":%s,"prompt":{"location":%s,"tier":%s},"response":{"location":%s,"tier":%s},"turn_id":%s}'
)


def turn_ingested(
    *,
    turn_id: str,
    turn_seq: int,
    saga_id: str,
    prompt_sha256: str,
    prompt_size: int,
    response_sha256: str,
    response_size: int,
) -> str:
    """The canonical body of a ``turn_ingested`` event (content hashes and sizes).

    Spelled out in key order, like :func:`chain_hash`, because the pivot writes one per turn; a
    test checks it against :func:`canonical` of the same fields.
    """
    return _TURN_INGESTED % (
        _string(prompt_sha256),
        prompt_size,
        _string(response_sha256),
        response_size,
        _string(saga_id),
        _string(turn_id),
        turn_seq,
    )


def content_stored(*, turn_id: str, prompt: tuple[str, str], response: tuple[str, str], embedding: bool) -> str:
    """The canonical body of a ``content_stored`` event; ``prompt`` and ``response`` are ``(tier, location)``."""
    return _CONTENT_STORED % (
        "true" if embedding else "false",
        _string(prompt[1]),
        _string(prompt[0]),
        _string(response[1]),
        _string(response[0]),
        _string(turn_id),
    )


def heads(conn: Connection, conversation_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
    """The last ``(seq, record_hash)`` of each conversation that has records."""
    if not conversation_ids:
        return {}
    last = (
        select(RECORDS.c.conversation_id, func.max(RECORDS.c.seq).label("seq"))
        .where(RECORDS.c.conversation_id.in_(list(conversation_ids)))
        .group_by(RECORDS.c.conversation_id)
        .subquery()
    )
    rows = conn.execute(
        select(RECORDS.c.conversation_id, RECORDS.c.seq, RECORDS.c.record_hash).join(
            last, (RECORDS.c.conversation_id == last.c.conversation_id) & (RECORDS.c.seq == last.c.seq)
        )
    )
    return {r.conversation_id: (r.seq, r.record_hash) for r in rows}


def append_many(
    conn: Connection,
    events: Sequence[tuple[str, ProvenanceKind, Mapping[str, Any] | str]],
    *,
    now: datetime,
    known_new: frozenset[str] = frozenset(),
) -> None:
    """Append ``(conversation_id, kind, body)`` events in order, with one set-based insert.

    ``known_new`` names conversations created in this transaction (no head to look up).  A body
    given as a string is already canonical (:func:`turn_ingested`, :func:`content_stored`).
    """
    if not events:
        return
    lookup = sorted({c for c, _, _ in events} - known_new)
    lock_chains(conn, lookup, now=now)
    state = heads(conn, lookup)
    rows: list[dict[str, Any]] = []
    for conversation_id, kind, body in events:
        seq, prev = state.get(conversation_id, (-1, GENESIS))
        seq += 1
        body_json = body if isinstance(body, str) else canonical(body)
        record_hash = chain_hash(conversation_id, seq, kind.value, body_json, prev)
        rows.append(
            {
                "conversation_id": conversation_id,
                "seq": seq,
                "kind": kind.value,
                "body": body_json,
                "prev_hash": prev,
                "record_hash": record_hash,
                "created_at": now,
            }
        )
        state[conversation_id] = (seq, record_hash)
    bulk_insert(conn, RECORDS, rows)


def append(
    conn: Connection, conversation_id: str, kind: ProvenanceKind, body: Mapping[str, Any], *, now: datetime
) -> tuple[int, str]:
    """Append one event to an existing conversation's chain; returns its ``(seq, record_hash)``.

    Run it through :meth:`CpDatabase.run` (with ``retry_unique_violation=True``): a concurrent
    append makes this transaction fail and re-run on the new head, never fork the chain.
    """
    append_many(conn, [(conversation_id, kind, body)], now=now)
    return heads(conn, [conversation_id])[conversation_id]


def lock_chains(conn: Connection, conversation_ids: Sequence[str], *, now: datetime) -> None:
    """Claim the conversations' chains for this transaction (PostgreSQL; SQLite serialises writers).

    An ``UPDATE`` of the conversation rows (``updated_at``), not a bare ``FOR UPDATE``: a
    serializable transaction that waited on the row then fails with 40001 as soon as the holder
    commits (first updater wins) and is re-run on the new head, instead of reading a stale head
    and tripping over the ``(conversation_id, seq)`` constraint.
    """
    if conn.dialect.name != "postgresql" or not conversation_ids:
        return
    conn.execute(_CLAIM_PG, {"ids": sorted(set(conversation_ids)), "now": now})


_CLAIM_PG = text("UPDATE conversations SET updated_at = :now WHERE id = ANY(CAST(:ids AS varchar[]))")


# ---- event bodies ----------------------------------------------------------------------------


def _actor(principal: Principal | None) -> dict[str, str]:
    return {} if principal is None else {"by": f"{principal.tenant}/{principal.name}"}


def derived_artifact(
    artifact: str,
    *,
    model: str,
    turn_seq: int | None = None,
    artifact_sha256: str | None = None,
    location: str | None = None,
    principal: Principal | None = None,
) -> tuple[ProvenanceKind, dict[str, Any]]:
    """A derived artifact (``artifact`` e.g. ``"embedding"``) made by ``model`` from the conversation."""
    body: dict[str, Any] = {"artifact": artifact, "model": model, **_actor(principal)}
    if turn_seq is not None:
        body["turn_seq"] = turn_seq
    if artifact_sha256 is not None:
        body["artifact_sha256"] = artifact_sha256
    if location is not None:
        body["location"] = location
    return ProvenanceKind.DERIVED_ARTIFACT, body


def access_change(
    *, granted: bool, subject: str, role: str, principal: Principal | None = None
) -> tuple[ProvenanceKind, dict[str, Any]]:
    """Access to the conversation granted to (or revoked from) ``subject`` with ``role``."""
    kind = ProvenanceKind.ACCESS_GRANTED if granted else ProvenanceKind.ACCESS_REVOKED
    return kind, {"subject": subject, "role": role, **_actor(principal)}


def redaction(
    *, erased: bool, turn_seqs: Sequence[int] | None, reason: str, principal: Principal | None = None
) -> tuple[ProvenanceKind, dict[str, Any]]:
    """Content redacted (or erased outright); ``turn_seqs`` of ``None`` means the whole conversation."""
    kind = ProvenanceKind.ERASED if erased else ProvenanceKind.REDACTED
    scope: list[int] | str = sorted(set(turn_seqs)) if turn_seqs is not None else "all"
    return kind, {"turns": scope, "reason": reason, **_actor(principal)}


def verify(conn: Connection, conversation_id: str) -> tuple[int, ChainBreak | None]:
    """Recompute a chain; returns (records checked, the first break or None)."""
    rows = conn.execute(
        select(RECORDS).where(RECORDS.c.conversation_id == conversation_id).order_by(RECORDS.c.seq)
    ).all()
    prev = GENESIS
    for expected_seq, r in enumerate(rows):
        if r.seq != expected_seq:
            return expected_seq, ChainBreak(
                conversation_id, expected_seq, str(expected_seq), str(r.seq), "gap in sequence"
            )
        if r.prev_hash != prev:
            return expected_seq, ChainBreak(conversation_id, r.seq, prev, r.prev_hash, "link to previous record broken")
        recomputed = chain_hash(conversation_id, r.seq, r.kind, r.body, r.prev_hash)
        if recomputed != r.record_hash:
            return expected_seq, ChainBreak(conversation_id, r.seq, recomputed, r.record_hash, "record content changed")
        prev = r.record_hash
    return len(rows), None


def records(conn: Connection, conversation_id: str) -> list[dict[str, Any]]:
    rows = conn.execute(select(RECORDS).where(RECORDS.c.conversation_id == conversation_id).order_by(RECORDS.c.seq))
    return [
        {
            "seq": r.seq,
            "kind": r.kind,
            "body": json.loads(r.body),
            "record_hash": r.record_hash,
            "prev_hash": r.prev_hash,
        }
        for r in rows
    ]
