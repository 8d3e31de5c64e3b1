"""What a caller sends and gets back, and the validation between the two.

``IngestionRequest`` accepts whatever it is given; :func:`validate` checks every field and returns
``Err(ValidationError)`` naming the first bad one, before anything is written.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from datamesh.core.errors import ValidationError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import ConversationId, EntityId, GeoRegion, TurnId

MAX_IDEMPOTENCY_KEY_CHARS = 200
MAX_EMBEDDING_DIM = 8192
MAX_METADATA_ITEMS = 64
MAX_METADATA_VALUE_CHARS = 1024
MAX_EMBEDDING_ABS = 3.4028234663852886e38  # embeddings are stored as float32


@dataclass(slots=True, kw_only=True)
class IngestionRequest:
    """One turn to store: a prompt and its response, owned by ``entity_id``, kept in ``geo_region``.

    Name an existing ``conversation_id`` to append a turn; leave it out to start a conversation.
    Without ``idempotency_key`` the key is derived from the content, so a replayed request is
    recognised.
    """

    entity_id: EntityId
    prompt: bytes
    response: bytes
    geo_region: GeoRegion
    conversation_id: ConversationId | None = None
    idempotency_key: str | None = None
    embedding: Sequence[float] | None = None
    metadata: Mapping[str, str] | None = None


@dataclass(frozen=True, slots=True)
class IngestionResponse:
    """The outcome of an accepted turn; ``deduplicated`` is true for a replay of an earlier request."""

    conversation_id: ConversationId
    turn_id: TurnId
    turn_seq: int
    saga_id: str
    latency_ms: float
    deduplicated: bool = False
    #: True when returned with ``wait=False`` before the saga finished (``turn_seq`` is -1 when unknown).
    pending: bool = False


@dataclass(frozen=True, slots=True)
class ValidRequest:
    """A request whose every field has been checked and normalised."""

    entity_id: EntityId
    prompt: bytes
    response: bytes
    region: GeoRegion
    conversation_id: ConversationId | None
    idempotency_key: str | None
    embedding: tuple[float, ...] | None
    metadata: dict[str, str] = field(default_factory=dict)


def validate(request: object, *, max_payload_bytes: int) -> Result[ValidRequest, ValidationError]:
    """Check a request; the error names the field (``prompt``, ``geo_region``, ...)."""
    if not isinstance(request, IngestionRequest):
        return Err(ValidationError("request", f"expected an IngestionRequest, got {type(request).__name__}"))
    entity = EntityId.parse(request.entity_id, "entity_id")
    if isinstance(entity, Err):
        return entity
    region = GeoRegion.parse(request.geo_region, "geo_region")
    if isinstance(region, Err):
        return region
    prompt = _payload(request.prompt, "prompt", allow_empty=False, limit=max_payload_bytes)
    if isinstance(prompt, Err):
        return prompt
    response = _payload(request.response, "response", allow_empty=True, limit=max_payload_bytes)
    if isinstance(response, Err):
        return response
    if len(prompt.value) + len(response.value) > max_payload_bytes:
        return Err(ValidationError("payload", f"prompt and response together exceed {max_payload_bytes} bytes"))
    conversation: ConversationId | None = None
    if request.conversation_id is not None:
        parsed = ConversationId.parse(request.conversation_id, "conversation_id")
        if isinstance(parsed, Err):
            return parsed
        conversation = parsed.value
    key = request.idempotency_key
    if key is not None and (
        not isinstance(key, str) or not 0 < len(key) <= MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable()
    ):
        return Err(ValidationError("idempotency_key", f"expected 1-{MAX_IDEMPOTENCY_KEY_CHARS} printable characters"))
    embedding = _embedding(request.embedding)
    if isinstance(embedding, Err):
        return embedding
    metadata = _metadata(request.metadata)
    if isinstance(metadata, Err):
        return metadata
    return Ok(
        ValidRequest(
            entity.value,
            prompt.value,
            response.value,
            region.value,
            conversation,
            key,
            embedding.value,
            metadata.value,
        )
    )


def _payload(raw: object, name: str, *, allow_empty: bool, limit: int) -> Result[bytes, ValidationError]:
    if isinstance(raw, bytearray | memoryview):
        raw = bytes(raw)
    if not isinstance(raw, bytes):
        return Err(ValidationError(name, f"expected bytes, got {type(raw).__name__}"))
    if not raw and not allow_empty:
        return Err(ValidationError(name, "must not be empty"))
    if len(raw) > limit:
        return Err(ValidationError(name, f"{len(raw)} bytes exceeds the maximum of {limit}"))
    return Ok(raw)


def _embedding(raw: object) -> Result[tuple[float, ...] | None, ValidationError]:
    if raw is None:
        return Ok(None)
    if isinstance(raw, str | bytes) or not isinstance(raw, Sequence):
        return Err(ValidationError("embedding", "expected a sequence of numbers"))
    if not 0 < len(raw) <= MAX_EMBEDDING_DIM:
        return Err(ValidationError("embedding", f"expected 1-{MAX_EMBEDDING_DIM} dimensions, got {len(raw)}"))
    values: list[float] = []
    for item in raw:
        if isinstance(item, bool) or not isinstance(item, int | float) or not math.isfinite(item):
            return Err(ValidationError("embedding", f"expected finite numbers, got {item!r}"))
        if abs(item) > MAX_EMBEDDING_ABS:
            return Err(ValidationError("embedding", f"{item!r} is outside the float32 range"))
        values.append(float(item))
    return Ok(tuple(values))


def _metadata(raw: object) -> Result[dict[str, str], ValidationError]:
    if raw is None:
        return Ok({})
    if not isinstance(raw, Mapping) or len(raw) > MAX_METADATA_ITEMS:
        return Err(ValidationError("metadata", f"expected a mapping of at most {MAX_METADATA_ITEMS} strings"))
    out: dict[str, str] = {}
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str) or not k or len(v) > MAX_METADATA_VALUE_CHARS:
            return Err(
                ValidationError("metadata", f"keys and values must be strings (value ≤ {MAX_METADATA_VALUE_CHARS})")
            )
        out[k] = v
    return Ok(out)
