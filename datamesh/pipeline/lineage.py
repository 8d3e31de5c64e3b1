"""Provenance events recorded after ingest: derived artifacts, access changes, redactions.

Each call checks, in the same serializable transaction as the append, that the conversation
exists, is active, belongs to the caller's tenant and an entity the caller sees; a conversation the
caller may not see is ``NotFound``.  Recording a derived artifact needs the ``write`` action;
access changes and redaction / erasure need ``admin``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy.engine import Connection

from datamesh.core.errors import AccessDenied, NotFound, StorageError, ValidationError
from datamesh.core.principal import Action, Principal
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import ConversationId
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import conversations, provenance
from datamesh.storage.cp.provenance import ProvenanceKind
from datamesh.storage.cp.sql import utcnow

LineageError = AccessDenied | NotFound | StorageError | ValidationError

#: The action each kind of event needs.
REQUIRED_ACTION: dict[ProvenanceKind, Action] = {
    ProvenanceKind.DERIVED_ARTIFACT: Action.WRITE,
    ProvenanceKind.ACCESS_GRANTED: Action.ADMIN,
    ProvenanceKind.ACCESS_REVOKED: Action.ADMIN,
    ProvenanceKind.REDACTED: Action.ADMIN,
    ProvenanceKind.ERASED: Action.ADMIN,
}


@dataclass(frozen=True, slots=True)
class ProvenanceEntry:
    """Where an appended event landed in its conversation's chain."""

    conversation_id: ConversationId
    seq: int
    kind: ProvenanceKind
    record_hash: str


def record_event(
    tiers: Tiers,
    principal: Principal,
    conversation_id: object,
    event: tuple[ProvenanceKind, Mapping[str, Any]],
) -> Result[ProvenanceEntry, LineageError]:
    """Append ``event`` to the conversation's chain on behalf of ``principal``."""
    kind, body = event
    parsed = ConversationId.parse(conversation_id, "conversation_id")
    if isinstance(parsed, Err):
        return parsed
    needed = REQUIRED_ACTION.get(kind)
    if needed is None:
        return Err(ValidationError("kind", f"{kind.value} events are written by the ingest saga only"))
    if not principal.can(needed):
        return Err(AccessDenied(needed.value, f"principal {principal.name!r} may not record {kind.value} events"))
    cid = str(parsed.value)

    def tx(conn: Connection) -> tuple[int, str] | None:
        row = conversations.get_many(conn, [cid]).get(cid)
        if (
            row is None
            or row.tenant != principal.tenant
            or row.status != conversations.ACTIVE
            or not principal.sees_entity(row.entity_id)
        ):
            return None
        return provenance.append(conn, cid, kind, body, now=utcnow())

    done = tiers.cp.run(tx, operation=f"provenance.{kind.value}", retry_unique_violation=True)
    if isinstance(done, Err):
        return done
    if done.value is None:
        return Err(NotFound("conversation", cid))
    seq, record_hash = done.value
    return Ok(ProvenanceEntry(parsed.value, seq, kind, record_hash))
