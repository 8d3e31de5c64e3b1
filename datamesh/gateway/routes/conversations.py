"""``/v1/conversations``: ingest one turn, ingest a batch, read a conversation back."""

from __future__ import annotations

import base64
import uuid
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from datamesh.core.principal import Action
from datamesh.core.result import Err
from datamesh.gateway.errors import ERROR_RESPONSES, ApiError, api_error, classify
from datamesh.gateway.routes.parsing import parse_batch, parse_item, parse_json
from datamesh.gateway.schemas import BatchItemOut, BatchOut, ConversationOut, ErrorBody, Ingested, TurnOut
from datamesh.gateway.state import authenticate, authorize, gateway_of, rate_limit
from datamesh.pipeline.reads import StoredConversation
from datamesh.pipeline.request import IngestionRequest, IngestionResponse

router = APIRouter(prefix="/v1", tags=["conversations"])


def _body(schema: str) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }


@router.post(
    "/conversations",
    status_code=201,
    response_model=Ingested,
    responses={200: {"model": Ingested, "description": "a replay: the first result"}, **ERROR_RESPONSES},
    openapi_extra=_body("ConversationIn"),
    summary="Ingest one turn",
)
async def ingest_one(request: Request) -> JSONResponse:
    gw = gateway_of(request)
    who = await authenticate(request, Action.WRITE)
    parsed = parse_item(parse_json(await request.body()))
    if isinstance(parsed, ErrorBody):
        gw.metrics.ingested.labels("rejected").inc()
        raise ApiError(422, parsed.type, parsed.message, field=parsed.field)
    caller = await rate_limit(request, who, 1)
    result = await gw.pipeline.ingest(parsed, principal=caller.principal)
    if isinstance(result, Err):
        gw.metrics.ingested.labels("rejected").inc()
        raise api_error(result.error)
    out = result.value
    gw.metrics.ingested.labels("deduplicated" if out.deduplicated else "accepted").inc()
    return JSONResponse(
        _ingested(out).model_dump(), status_code=200 if out.deduplicated else 201, headers=caller.headers
    )


@router.post(
    "/conversations/batch",
    response_model=BatchOut,
    responses=ERROR_RESPONSES,
    openapi_extra=_body("BatchIn"),
    summary="Ingest many turns; a result per item",
)
async def ingest_batch(request: Request) -> JSONResponse:
    gw = gateway_of(request)
    who = await authenticate(request, Action.WRITE)
    docs = parse_batch(parse_json(await request.body()), gw.config.gateway_max_batch)
    items: list[BatchItemOut | None] = [None] * len(docs)
    valid: list[tuple[int, IngestionRequest]] = []
    for index, doc in enumerate(docs):
        parsed = parse_item(doc, f"items.{index}.")
        if isinstance(parsed, ErrorBody):
            items[index] = BatchItemOut(index=index, status=422, error=parsed)
        else:
            valid.append((index, parsed))
    caller = await rate_limit(request, who, max(1, len(valid)))
    if valid:
        results = await gw.pipeline.ingest_many([r for _, r in valid], principal=caller.principal)
        if isinstance(results, Err):
            raise api_error(results.error)
        for (index, _), outcome in zip(valid, results.value, strict=True):
            if isinstance(outcome, Err):
                status, body = classify(outcome.error)
                if body.field is not None and status == 422:
                    body = body.model_copy(update={"field": f"items.{index}.{body.field}"})
                items[index] = BatchItemOut(index=index, status=status, error=body)
            else:
                code = 200 if outcome.value.deduplicated else 201
                items[index] = BatchItemOut(index=index, status=code, result=_ingested(outcome.value))
    done = [i for i in items if i is not None]
    accepted = sum(1 for i in done if i.result is not None)
    deduplicated = sum(1 for i in done if i.result is not None and i.result.deduplicated)
    gw.metrics.ingested.labels("accepted").inc(accepted - deduplicated)
    gw.metrics.ingested.labels("deduplicated").inc(deduplicated)
    gw.metrics.ingested.labels("rejected").inc(len(done) - accepted)
    out = BatchOut(accepted=accepted, rejected=len(done) - accepted, items=done)
    return JSONResponse(out.model_dump(), headers=caller.headers)


@router.get(
    "/conversations/{conversation_id}",
    response_model=ConversationOut,
    responses={k: v for k, v in ERROR_RESPONSES.items() if k not in (400, 409, 413)},
    summary="A conversation with every turn, verified against the CP hashes",
)
async def get_conversation(request: Request, conversation_id: uuid.UUID) -> JSONResponse:
    gw = gateway_of(request)
    caller = await authorize(request, Action.READ)
    found = await gw.pipeline.get(str(conversation_id), principal=caller.principal)
    if isinstance(found, Err):
        raise api_error(found.error)
    return JSONResponse(_conversation(found.value).model_dump(), headers=caller.headers)


def _ingested(r: IngestionResponse) -> Ingested:
    return Ingested(
        conversation_id=str(r.conversation_id),
        turn_id=str(r.turn_id),
        turn_seq=r.turn_seq,
        saga_id=r.saga_id,
        deduplicated=r.deduplicated,
        latency_ms=round(r.latency_ms, 3),
    )


def _conversation(c: StoredConversation) -> ConversationOut:
    return ConversationOut(
        conversation_id=str(c.conversation_id),
        entity_id=str(c.entity_id),
        geo_region=c.region.value,
        created_at=c.created_at.isoformat(),
        turns=[
            TurnOut(
                seq=t.seq,
                turn_id=str(t.turn_id),
                prompt=base64.b64encode(t.prompt).decode(),
                response=base64.b64encode(t.response).decode(),
                embedding=list(t.embedding) if t.embedding is not None else None,
                metadata=t.metadata,
                prompt_sha256=t.prompt_sha256,
                response_sha256=t.response_sha256,
                created_at=t.created_at.isoformat(),
            )
            for t in c.turns
        ],
    )
