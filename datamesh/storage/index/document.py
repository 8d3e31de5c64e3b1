"""What the index tier stores and returns: :class:`IndexDocument` in, :class:`SearchHit` out.

One document is one prompt/response turn.  The access fields (``tenant``, ``entity_id``,
``created_at``) travel with it so that searches filter on them inside the query, and ``region``
says which regional index may hold it.
"""

from __future__ import annotations

import math
from collections.abc import Set
from dataclasses import dataclass
from datetime import datetime

from datamesh.core.errors import ValidationError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import ConversationId, EntityId, GeoRegion, TurnId

_EPOCH_OFFSET = datetime(1970, 1, 1).toordinal()


@dataclass(frozen=True, slots=True)
class IndexDocument:
    """One turn to index.  ``created_at`` must be timezone-aware (it is stored as UTC microseconds)."""

    conversation_id: ConversationId
    turn_id: TurnId
    tenant: str
    entity_id: EntityId
    region: GeoRegion
    created_at: datetime
    prompt: str
    response: str
    embedding: tuple[float, ...] | None = None


@dataclass(frozen=True, slots=True)
class SearchHit:
    """One matching turn.  ``score``: higher is better; bm25 (text), cosine (vector) or RRF (hybrid)."""

    conversation_id: ConversationId
    turn_id: TurnId
    score: float
    snippet: str


@dataclass(frozen=True, slots=True)
class AccessFilter:
    """The caller's visibility, applied inside every query.

    ``allowed_entities=None`` means every entity of ``tenant``; an empty set means none.
    ``entity_id`` narrows further to one entity.  ``since`` is inclusive, ``until`` exclusive.
    """

    tenant: str
    allowed_entities: Set[EntityId] | None = None
    entity_id: EntityId | None = None
    since: datetime | None = None
    until: datetime | None = None

    def entity_strings(self) -> list[str] | None:
        """The entity ids a hit may belong to, or ``None`` for any entity of the tenant."""
        allowed: set[str] | None = None
        if self.allowed_entities is not None:
            allowed = {str(e) for e in self.allowed_entities}
        if self.entity_id is not None:
            one = {str(self.entity_id)}
            allowed = one if allowed is None else allowed & one
        return None if allowed is None else sorted(allowed)

    def since_us(self) -> int | None:
        return None if self.since is None else to_micros(self.since)

    def until_us(self) -> int | None:
        return None if self.until is None else to_micros(self.until)


@dataclass(frozen=True, slots=True)
class IndexQuery:
    """One search as each regional index runs it: words, a vector or both, the caller's access
    (applied inside the query, so ranks never depend on what the caller may not see), a limit."""

    text: str | None
    vector: tuple[float, ...] | None
    access: AccessFilter
    limit: int


def to_micros(moment: datetime) -> int:
    """Microseconds since the Unix epoch (UTC) of an aware datetime; exact, no float rounding."""
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError("naive datetime")
    naive = moment.replace(tzinfo=None) - offset
    days = naive.toordinal() - _EPOCH_OFFSET
    seconds = naive.hour * 3600 + naive.minute * 60 + naive.second
    return (days * 86_400 + seconds) * 1_000_000 + naive.microsecond


def check_document(doc: IndexDocument, region: GeoRegion, dim: int) -> Result[None, ValidationError]:
    """Reject a document this region's index must not hold or cannot store; nothing is written."""
    if doc.region is not region:
        return Err(ValidationError("region", f"document of {doc.region.value} sent to the {region.value} index"))
    if not doc.tenant:
        return Err(ValidationError("tenant", "empty tenant"))
    if doc.created_at.utcoffset() is None:
        return Err(ValidationError("created_at", "must be timezone-aware (UTC)"))
    if doc.embedding is not None:
        if len(doc.embedding) != dim:
            return Err(ValidationError("embedding", f"expected {dim} dimensions, got {len(doc.embedding)}"))
        norm = math.sqrt(math.fsum(x * x for x in doc.embedding))
        if not math.isfinite(norm) or norm == 0.0:
            return Err(ValidationError("embedding", "zero or non-finite vector"))
    return Ok(None)


def check_filter(access: AccessFilter, limit: int) -> Result[None, ValidationError]:
    """Reject malformed search arguments before touching an engine."""
    if not access.tenant:
        return Err(ValidationError("tenant", "empty tenant"))
    if limit <= 0 or limit > 10_000:
        return Err(ValidationError("limit", f"must be in 1..10000, got {limit}"))
    for name, moment in (("since", access.since), ("until", access.until)):
        if moment is not None and moment.utcoffset() is None:
            return Err(ValidationError(name, "must be timezone-aware (UTC)"))
    return Ok(None)


__all__ = ["AccessFilter", "IndexDocument", "IndexQuery", "SearchHit", "check_document", "check_filter", "to_micros"]
