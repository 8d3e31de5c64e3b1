"""The read path: CP first (existence, access, hashes), then AP and objects, verified.

Content is returned only when it hashes to what the CP tier recorded; anything else is
``Err(IntegrityError)``, never wrong bytes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

from datamesh.core.errors import IntegrityError, NotFound, StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import ConversationId, EntityId, GeoRegion, TurnId
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.ap.record import Payload, RecordFormatError, TurnContent, turn_key
from datamesh.storage.cp import conversations

ReadError = NotFound | IntegrityError | StorageError


@dataclass(frozen=True, slots=True)
class StoredTurn:
    seq: int
    turn_id: TurnId
    prompt: bytes
    response: bytes
    embedding: tuple[float, ...] | None
    metadata: dict[str, str]
    prompt_sha256: str
    response_sha256: str
    prompt_location: str
    response_location: str
    created_at: datetime


@dataclass(frozen=True, slots=True)
class StoredConversation:
    conversation_id: ConversationId
    entity_id: EntityId
    region: GeoRegion
    tenant: str
    created_at: datetime
    turns: list[StoredTurn] = field(default_factory=list)


def get_conversation(
    tiers: Tiers, tenant: str, conversation_id: ConversationId
) -> Result[StoredConversation, ReadError]:
    def tx(conn: object) -> tuple[conversations.ConversationRow | None, list[conversations.TurnRow]]:
        rows = conversations.get_many(conn, [str(conversation_id)])  # type: ignore[arg-type]
        row = rows.get(str(conversation_id))
        if row is None:
            return None, []
        return row, conversations.turns_of(conn, row.id)  # type: ignore[arg-type]

    found = tiers.cp.run(tx, operation="read.conversation", write=False)
    if isinstance(found, Err):
        return found
    row, turn_rows = found.value
    if row is None or row.tenant != tenant or row.status != conversations.ACTIVE:
        return Err(NotFound("conversation", str(conversation_id)))
    region = GeoRegion(row.region)
    entity = EntityId.parse(row.entity_id).unwrap()
    keys = {t.turn_id: turn_key(entity, conversation_id, TurnId.parse(t.turn_id).unwrap()) for t in turn_rows}
    content = tiers.ap.get_many(region, list(keys.values()))
    if isinstance(content, Err):
        return content
    turns: list[StoredTurn] = []
    for t in turn_rows:
        raw = content.value.get(keys[t.turn_id])
        if raw is None:
            return Err(StorageError("ap", "read", f"content of turn {t.turn_id} is missing from the AP tier"))
        verified = verified_content(tiers, region, t, raw)
        if isinstance(verified, Err):
            return verified
        prompt, response, embedding = verified.value
        turns.append(
            StoredTurn(
                t.seq,
                TurnId.parse(t.turn_id).unwrap(),
                prompt,
                response,
                embedding,
                t.metadata,
                t.prompt_sha256,
                t.response_sha256,
                t.prompt_location,
                t.response_location,
                t.created_at,
            )
        )
    return Ok(StoredConversation(conversation_id, entity, region, row.tenant, row.created_at, turns))


class HashedTurn(Protocol):
    """A turn as the CP tier recorded it: its id and the hashes its content must match."""

    @property
    def turn_id(self) -> str: ...

    @property
    def prompt_sha256(self) -> str: ...

    @property
    def response_sha256(self) -> str: ...


def verified_content(
    tiers: Tiers, region: GeoRegion, t: HashedTurn, raw: bytes
) -> Result[tuple[bytes, bytes, tuple[float, ...] | None], ReadError]:
    """A turn's prompt, response and embedding from its AP record, checked against the CP hashes."""
    try:
        record = TurnContent.decode(raw)
    except RecordFormatError as exc:
        return Err(IntegrityError(f"turn {t.turn_id} record", "a valid record", str(exc)))
    prompt = resolve_payload(tiers, region, record.prompt, t.prompt_sha256, f"turn {t.turn_id} prompt")
    if isinstance(prompt, Err):
        return prompt
    response = resolve_payload(tiers, region, record.response, t.response_sha256, f"turn {t.turn_id} response")
    if isinstance(response, Err):
        return response
    return Ok((prompt.value, response.value, record.embedding))


def resolve_payload(
    tiers: Tiers, region: GeoRegion, payload: Payload, expected: str, what: str
) -> Result[bytes, ReadError]:
    """The bytes of one payload (inline or in the object store), verified against ``expected``."""
    if payload.inline is not None:
        actual = hashlib.sha256(payload.inline).hexdigest()
        if actual != expected:
            return Err(IntegrityError(what, expected, actual))
        return Ok(payload.inline)
    assert payload.ref is not None
    if payload.ref.hex != expected:
        return Err(IntegrityError(what, expected, payload.ref.hex))
    store = tiers.objects.for_region(region)
    if isinstance(store, Err):
        return store
    return store.value.get(payload.ref)
