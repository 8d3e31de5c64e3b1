"""Searches routed to a region's index host: ``query_index`` on ``search.<region>``.

With ``DATAMESH_INDEX_READS=workers`` a process that does not see the index files (the Celery-mode
pipeline, the gateway, the CLI; on any host) sends each region's part of a search here
(:mod:`datamesh.workers.remote_search`) and waits for the answer in Celery's result backend.  The
region's search workers (``worker --role search``) answer from the index files opened read-only
(:meth:`~datamesh.workers.runtime.Runtime.search_indexes`), as a ``files`` reader on that host
would: the same hits, scores and order.  They never write the index (its one writer is the index
worker, on ``index.<region>``), so several processes may serve a region's queue, and a search never
waits behind an index drain.

The access filter (tenant, allowed entities, entity, time range) travels in the query and is
applied inside the index's query, as locally.  The wire format is JSON: datetimes as ISO 8601 with
their offset, floats as JSON numbers (Python writes and reads them back exactly).  A search the
index refuses comes back as ``{"invalid": field, "message": ...}`` (the caller's 422), one it
could not do as ``{"error": ..., "retryable": ...}``; neither is a task failure.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from celery import shared_task

from datamesh.core.errors import StorageError, ValidationError
from datamesh.core.result import Err
from datamesh.core.types import ConversationId, EntityId, GeoRegion, TurnId
from datamesh.storage.index import AccessFilter, IndexQuery, SearchHit
from datamesh.workers import queues
from datamesh.workers.replies import ANSWER_TASK, Reply
from datamesh.workers.runtime import RUNTIME

SEARCH, COUNT = "search", "count"


@shared_task(name=queues.QUERY_INDEX, **ANSWER_TASK)
def query_index_task(*, region: str, op: str, query: Reply | None = None) -> Reply:
    """Answer one region's part: ``search`` (``query``, see :func:`encode_query`) or ``count``."""
    indexes, where = RUNTIME.search_indexes(), GeoRegion(region)
    if op == SEARCH and query is not None:
        found = indexes.search_regions([where], decode_query(query))
        if isinstance(found, Err):
            return _failed(found.error)
        return {"hits": encode_hits(found.value[0])}
    if op == COUNT:
        counted = indexes.count_regions([where])
        if isinstance(counted, Err):
            return _failed(counted.error)
        return {"count": counted.value[0]}
    return {"error": f"unknown index operation {op!r}", "retryable": False}


def _failed(error: ValidationError | StorageError) -> Reply:
    if isinstance(error, ValidationError):
        return {"invalid": error.field, "message": error.message}
    return {"error": error.message, "retryable": error.retryable}


def encode_query(query: IndexQuery) -> Reply:
    access = query.access
    allowed = access.allowed_entities
    return {
        "text": query.text,
        "vector": None if query.vector is None else list(query.vector),
        "tenant": access.tenant,
        "allowed_entities": None if allowed is None else sorted(str(e) for e in allowed),
        "entity_id": None if access.entity_id is None else str(access.entity_id),
        "since": _moment(access.since),
        "until": _moment(access.until),
        "limit": query.limit,
    }


def decode_query(data: Reply) -> IndexQuery:
    allowed = data["allowed_entities"]
    access = AccessFilter(
        data["tenant"],
        None if allowed is None else frozenset(EntityId.parse(e).unwrap() for e in allowed),
        None if data["entity_id"] is None else EntityId.parse(data["entity_id"]).unwrap(),
        _parse_moment(data["since"]),
        _parse_moment(data["until"]),
    )
    vector = data["vector"]
    return IndexQuery(data["text"], None if vector is None else tuple(vector), access, int(data["limit"]))


def encode_hits(hits: list[SearchHit]) -> list[list[Any]]:
    return [[str(h.conversation_id), str(h.turn_id), h.score, h.snippet] for h in hits]


def decode_hits(rows: list[list[Any]]) -> list[SearchHit]:
    return [
        SearchHit(ConversationId.parse(c).unwrap(), TurnId.parse(t).unwrap(), float(score), snippet)
        for c, t, score, snippet in rows
    ]


def _moment(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def _parse_moment(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)
