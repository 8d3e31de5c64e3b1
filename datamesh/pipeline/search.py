"""The query path: access-checked search over the regional indexes, resolved against the CP tier.

The caller's tenant and entity grants go *into* each index query (``tenant``,
``allowed_entities``), so ranks and counts never depend on what the caller may not see.  With no
``region`` every region that has an index is searched and the hits merged by score (text scores
are negated BM25 per region, vector scores cosine, hybrid scores reciprocal-rank fusion; so a
cross-region text merge is approximate).  Each hit is then looked up in the CP tier for its turn
sequence number; a hit whose conversation is no longer active (erased after the index was last
fed) is dropped, never returned.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.engine import Connection

from datamesh.core.errors import Error, ValidationError
from datamesh.core.principal import Principal
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import ConversationId, EntityId, GeoRegion, TurnId
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import conversations
from datamesh.storage.index import AccessFilter, IndexQuery, IndexReader, RegionalIndexes

MAX_LIMIT = 1000
MAX_TEXT_CHARS = 4096


@dataclass(frozen=True, slots=True)
class SearchResult:
    """One matching turn: where it is, how well it matched (higher is better) and a snippet."""

    conversation_id: ConversationId
    turn_id: TurnId
    turn_seq: int
    entity_id: EntityId
    region: GeoRegion
    score: float
    snippet: str


@dataclass(frozen=True, slots=True, kw_only=True)
class SearchQuery:
    """Validated search arguments."""

    text: str | None
    vector: tuple[float, ...] | None
    entity_id: EntityId | None
    regions: tuple[GeoRegion, ...] | None
    since: datetime | None
    until: datetime | None
    limit: int


def validate_query(
    *,
    text: object,
    vector: object,
    entity_id: object,
    region: object,
    since: object,
    until: object,
    limit: object,
) -> Result[SearchQuery, ValidationError]:
    """Check every argument; ``Err(ValidationError)`` names the first bad one."""
    if text is None and vector is None:
        return Err(ValidationError("text", "give text, vector or both"))
    if text is not None and (not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT_CHARS):
        return Err(ValidationError("text", f"expected 1-{MAX_TEXT_CHARS} characters"))
    parsed_vector: tuple[float, ...] | None = None
    if vector is not None:
        if isinstance(vector, str | bytes) or not isinstance(vector, Sequence) or not vector:
            return Err(ValidationError("vector", "expected a non-empty list of numbers"))
        if not all(isinstance(x, int | float) and not isinstance(x, bool) for x in vector):
            return Err(ValidationError("vector", "expected numbers only"))
        parsed_vector = tuple(float(x) for x in vector)
    entity: EntityId | None = None
    if entity_id is not None:
        parsed_entity = EntityId.parse(entity_id, "entity_id")
        if isinstance(parsed_entity, Err):
            return parsed_entity
        entity = parsed_entity.value
    regions: tuple[GeoRegion, ...] | None = None
    if region is not None:
        parsed_region = GeoRegion.parse(region, "region")
        if isinstance(parsed_region, Err):
            return parsed_region
        regions = (parsed_region.value,)
    for name, moment in (("since", since), ("until", until)):
        if moment is not None and (not isinstance(moment, datetime) or moment.utcoffset() is None):
            return Err(ValidationError(name, "expected a timezone-aware datetime"))
    if isinstance(since, datetime) and isinstance(until, datetime) and since >= until:
        return Err(ValidationError("until", "must be after since"))
    if not isinstance(limit, int) or isinstance(limit, bool) or not 1 <= limit <= MAX_LIMIT:
        return Err(ValidationError("limit", f"expected an integer from 1 to {MAX_LIMIT}"))
    return Ok(
        SearchQuery(
            text=text if isinstance(text, str) else None,
            vector=parsed_vector,
            entity_id=entity,
            regions=regions,
            since=since if isinstance(since, datetime) else None,
            until=until if isinstance(until, datetime) else None,
            limit=limit,
        )
    )


def allowed_entities(principal: Principal) -> frozenset[EntityId] | None:
    """The principal's entity grants as ids (``None``: every entity of its tenant)."""
    if principal.entities is None:
        return None
    parsed = (EntityId.parse(e) for e in principal.entities)
    return frozenset(p.value for p in parsed if isinstance(p, Ok))


def search(
    tiers: Tiers, indexes: IndexReader, principal: Principal, query: SearchQuery
) -> Result[list[SearchResult], Error]:
    """Search the query's regions (or every indexed region) as ``principal``; best ``limit`` hits.

    ``indexes`` answers each region's part: the index files opened here, or the regions' search
    workers (``DATAMESH_INDEX_READS``); the access filter goes into the query either way.
    """
    regions = query.regions if query.regions is not None else tuple(GeoRegion)
    access = AccessFilter(principal.tenant, allowed_entities(principal), query.entity_id, query.since, query.until)
    found = indexes.search_regions(regions, IndexQuery(query.text, query.vector, access, query.limit))
    if isinstance(found, Err):
        return Err(found.error)
    hits = [(region, h) for region, region_hits in zip(regions, found.value, strict=True) for h in region_hits]
    hits.sort(key=lambda rh: rh[1].score, reverse=True)
    hits = hits[: query.limit]
    if not hits:
        return Ok([])
    turn_ids = [str(h.turn_id) for _, h in hits]

    def tx(conn: Connection) -> dict[str, tuple[conversations.TurnRow, conversations.ConversationRow]]:
        return conversations.turns_by_ids(conn, turn_ids)

    rows = tiers.cp.run(tx, operation="search.resolve", write=False)
    if isinstance(rows, Err):
        return rows
    out: list[SearchResult] = []
    for region, hit in hits:
        found_row = rows.value.get(str(hit.turn_id))
        if found_row is None:
            continue
        turn, conversation = found_row
        if conversation.status != conversations.ACTIVE or conversation.tenant != principal.tenant:
            continue
        out.append(
            SearchResult(
                hit.conversation_id,
                hit.turn_id,
                turn.seq,
                EntityId.parse(conversation.entity_id).unwrap(),
                region,
                hit.score,
                hit.snippet,
            )
        )
    return Ok(out)


def indexed_regions(indexes: RegionalIndexes) -> tuple[GeoRegion, ...]:
    """Regions that have an index (nothing was ever indexed in the others)."""
    return tuple(r for r in GeoRegion if indexes.exists(r))


__all__ = ["SearchQuery", "SearchResult", "allowed_entities", "indexed_regions", "search", "validate_query"]
