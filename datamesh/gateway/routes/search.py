"""``/v1/search``: access-checked search over the index tier (``GET`` by words, ``POST`` with a vector)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError as PydanticError

from datamesh.core.principal import Action
from datamesh.core.result import Err
from datamesh.core.types import GeoRegion
from datamesh.gateway.errors import ERROR_RESPONSES, ApiError, api_error
from datamesh.gateway.routes.parsing import parse_json, pydantic_error
from datamesh.gateway.schemas import SearchHitOut, SearchIn, SearchOut
from datamesh.gateway.state import authorize, gateway_of
from datamesh.pipeline.search import MAX_LIMIT, MAX_TEXT_CHARS, SearchResult

router = APIRouter(prefix="/v1", tags=["search"])

_GET_ERRORS = {k: v for k, v in ERROR_RESPONSES.items() if k not in (400, 409, 413)}
_POST_ERRORS = {k: v for k, v in ERROR_RESPONSES.items() if k != 409}


@router.get(
    "/search",
    response_model=SearchOut,
    responses=_GET_ERRORS,
    summary="Turns the key may see that match words, best first",
)
async def search_get(
    request: Request,
    text: Annotated[str, Query(min_length=1, max_length=MAX_TEXT_CHARS, description="words to find")],
    entity_id: uuid.UUID | None = None,
    region: GeoRegion | None = None,
    since: Annotated[datetime | None, Query(description="ISO 8601 with a time zone, inclusive")] = None,
    until: Annotated[datetime | None, Query(description="ISO 8601 with a time zone, exclusive")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIMIT)] = 10,
) -> JSONResponse:
    return await _search(request, text, None, entity_id, region, since, until, limit)


@router.post(
    "/search",
    response_model=SearchOut,
    responses=_POST_ERRORS,
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/SearchIn"}}},
        }
    },
    summary="Turns the key may see that match words, a vector, or both",
)
async def search_post(request: Request) -> JSONResponse:
    doc = parse_json(await request.body())
    try:
        body = SearchIn.model_validate(doc)
    except PydanticError as exc:
        raise pydantic_error(exc, "") from None
    since = _moment(body.since, "since")
    until = _moment(body.until, "until")
    vector = [float(x) for x in body.vector] if body.vector is not None else None
    return await _search(request, body.text, vector, body.entity_id, body.region, since, until, body.limit)


async def _search(
    request: Request,
    text: str | None,
    vector: list[float] | None,
    entity_id: uuid.UUID | None,
    region: GeoRegion | None,
    since: datetime | None,
    until: datetime | None,
    limit: int,
) -> JSONResponse:
    gw = gateway_of(request)
    caller = await authorize(request, Action.READ)
    found = await gw.pipeline.search(
        text,
        vector,
        entity_id=str(entity_id) if entity_id is not None else None,
        region=region,
        since=since,
        until=until,
        limit=limit,
        principal=caller.principal,
    )
    if isinstance(found, Err):
        raise api_error(found.error)
    out = SearchOut(hits=[_hit(h) for h in found.value])
    return JSONResponse(out.model_dump(), headers=caller.headers)


def _moment(raw: str | None, field: str) -> datetime | None:
    if raw is None:
        return None
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        raise ApiError(422, "validation", "expected an ISO 8601 date and time", field=field) from None
    if moment.utcoffset() is None:
        raise ApiError(422, "validation", "expected a time zone (e.g. Z or +00:00)", field=field)
    return moment


def _hit(h: SearchResult) -> SearchHitOut:
    return SearchHitOut(
        conversation_id=str(h.conversation_id),
        turn_id=str(h.turn_id),
        turn_seq=h.turn_seq,
        entity_id=str(h.entity_id),
        geo_region=h.region.value,
        score=h.score,
        snippet=h.snippet,
    )
