"""Erasure of a conversation or of every conversation of an entity, on every tier.

Who may erase: admins, and writers whose grants cover the entity (a principal narrowed to other
entities gets ``NotFound``, as for reads).  Readers may not (``AccessDenied``).

One CP transaction marks the conversations ``erased`` (from then on ``get`` answers ``NotFound``
and search drops their hits), appends an ``erased`` provenance event to each chain, drops the
object-store references their turns held (deleting blobs no other reference keeps, with the blob
rows locked, as compensation does; ``objects gc`` collects anything left), and writes index
outbox rows.  The outbox rows' work — deleting the AP content and the index entries — is done by
the indexer (:mod:`datamesh.pipeline.indexer`), retried until done; the pipeline runs it at once.
Erasing again is harmless (nothing left to erase is not an error).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.engine import Connection

from datamesh.core.errors import AccessDenied, Error, NotFound, StorageError
from datamesh.core.principal import Action, Principal
from datamesh.core.result import Err, Result
from datamesh.core.types import ContentHash, ConversationId, EntityId, GeoRegion
from datamesh.pipeline.plan import LOCATION_AP
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import conversations, index_outbox, object_refs, provenance
from datamesh.storage.cp.conversations import TURNS, ConversationRow
from datamesh.storage.cp.sql import utcnow


@dataclass(slots=True)
class ErasureReport:
    """What one erasure changed in the CP tier (the AP and index work follows through the outbox)."""

    conversations: list[str] = field(default_factory=list)
    turns: int = 0
    blobs_deleted: int = 0


class _BlobDeleteFailed(Exception):
    pass


class _Refused(Exception):
    def __init__(self, error: NotFound | AccessDenied) -> None:
        super().__init__(str(error))
        self.error = error


def erase_conversation(
    tiers: Tiers, principal: Principal, conversation_id: ConversationId, *, reason: str = "erasure request"
) -> Result[ErasureReport, Error]:
    """Erase one conversation of the principal's tenant."""
    if not principal.can(Action.WRITE):
        return Err(AccessDenied("erase", f"principal {principal.name!r} may not erase"))

    def tx(conn: Connection) -> ErasureReport:
        cid = str(conversation_id)
        row = conversations.get_many(conn, [cid]).get(cid)
        if row is None or row.tenant != principal.tenant or not principal.sees_entity(row.entity_id):
            raise _Refused(NotFound("conversation", cid))
        if row.status != conversations.ACTIVE:
            return ErasureReport()
        return _erase(conn, tiers, principal, [row], index_outbox.ERASE_CONVERSATION, reason)

    return _run(tiers, tx)


def erase_entity(
    tiers: Tiers, principal: Principal, entity_id: EntityId, *, reason: str = "erasure request"
) -> Result[ErasureReport, Error]:
    """Erase every conversation of one entity of the principal's tenant."""
    if not principal.can(Action.WRITE):
        return Err(AccessDenied("erase", f"principal {principal.name!r} may not erase"))
    if not principal.sees_entity(str(entity_id)):
        return Err(NotFound("entity", str(entity_id)))

    def tx(conn: Connection) -> ErasureReport:
        rows = conversations.of_entity(conn, principal.tenant, str(entity_id), status=None)
        if not rows:
            raise _Refused(NotFound("entity", str(entity_id)))
        active = [r for r in rows if r.status == conversations.ACTIVE]
        if not active:
            return ErasureReport()
        return _erase(conn, tiers, principal, active, index_outbox.ERASE_ENTITY, reason)

    return _run(tiers, tx)


def _run(tiers: Tiers, tx: object) -> Result[ErasureReport, Error]:
    try:
        return tiers.cp.run(tx, operation="erasure")  # type: ignore[arg-type]
    except _Refused as refused:
        return Err(refused.error)
    except _BlobDeleteFailed as exc:
        return Err(StorageError("objects", "erasure", str(exc), retryable=True))


def _erase(
    conn: Connection, tiers: Tiers, principal: Principal, rows: list[ConversationRow], op: str, reason: str
) -> ErasureReport:
    now = utcnow()
    ids = sorted(r.id for r in rows)
    provenance.lock_chains(conn, ids, now=now)
    conversations.mark(conn, ids, conversations.ERASED, now)
    event = provenance.redaction(erased=True, turn_seqs=None, reason=reason, principal=principal)
    provenance.append_many(conn, [(cid, event[0], event[1]) for cid in ids], now=now)
    turns = conversations.turns_of_many(conn, ids)
    region_of = {r.id: r.region for r in rows}
    refs = _refs_to_drop(conn, turns, region_of)

    def delete_blob(region: str, content_hash: str) -> None:
        store = tiers.objects.for_region(GeoRegion(region))
        if isinstance(store, Err):
            return
        deleted = store.value.delete(ContentHash(content_hash))
        if isinstance(deleted, Err):
            raise _BlobDeleteFailed(str(deleted.error))

    deleted = object_refs.drop_turn_refs(conn, refs, delete_blob)
    if op == index_outbox.ERASE_CONVERSATION:
        work = [(op, r.id, r.region, r.tenant) for r in rows]
    else:
        work = [(op, rows[0].entity_id, region, rows[0].tenant) for region in sorted({r.region for r in rows})]
    index_outbox.enqueue(conn, work, now)
    return ErasureReport(ids, len(turns), len(deleted))


def _refs_to_drop(
    conn: Connection, turns: list[conversations.TurnRow], region_of: dict[str, str]
) -> list[tuple[str, str, str]]:
    """``(region, hash, saga)`` references of erased turns that no live turn of the same saga uses."""
    wanted: set[tuple[str, str, str]] = set()
    for t in turns:
        region = region_of[t.conversation_id]
        for location, sha in ((t.prompt_location, t.prompt_sha256), (t.response_location, t.response_sha256)):
            if location != LOCATION_AP:
                wanted.add((region, sha, t.saga_id))
    if not wanted:
        return []
    sagas = sorted({s for _, _, s in wanted})
    kept: set[tuple[str, str, str]] = set()
    for start in range(0, len(sagas), 400):
        rows = conn.execute(
            select(TURNS, conversations.CONVERSATIONS.c.region.label("c_region"))
            .join(conversations.CONVERSATIONS, conversations.CONVERSATIONS.c.id == TURNS.c.conversation_id)
            .where(
                TURNS.c.saga_id.in_(sagas[start : start + 400]),
                conversations.CONVERSATIONS.c.status == conversations.ACTIVE,
            )
        )
        for r in rows:
            if r.prompt_location != LOCATION_AP:
                kept.add((r.c_region, r.prompt_sha256, r.saga_id))
            if r.response_location != LOCATION_AP:
                kept.add((r.c_region, r.response_sha256, r.saga_id))
    return sorted(wanted - kept)


__all__ = ["ErasureReport", "erase_conversation", "erase_entity"]
