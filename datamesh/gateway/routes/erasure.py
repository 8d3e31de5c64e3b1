"""Erasure: ``DELETE /v1/entities/{id}`` and ``DELETE /v1/conversations/{id}`` (writers of the entity, admins)."""

from __future__ import annotations

import uuid

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from datamesh.core.errors import Error
from datamesh.core.principal import Action
from datamesh.core.result import Err, Result
from datamesh.gateway.errors import ERROR_RESPONSES, api_error
from datamesh.gateway.schemas import ErasedOut
from datamesh.gateway.state import authorize, gateway_of
from datamesh.pipeline.erasure import ErasureReport

router = APIRouter(prefix="/v1", tags=["erasure"])

_ERRORS = {k: v for k, v in ERROR_RESPONSES.items() if k not in (400, 409, 413)}


@router.delete(
    "/entities/{entity_id}",
    response_model=ErasedOut,
    responses=_ERRORS,
    summary="Erase every conversation of an entity from every tier",
)
async def erase_entity(request: Request, entity_id: uuid.UUID) -> JSONResponse:
    gw = gateway_of(request)
    caller = await authorize(request, Action.WRITE)
    return _answer(await gw.pipeline.erase_entity(str(entity_id), principal=caller.principal), caller.headers)


@router.delete(
    "/conversations/{conversation_id}",
    response_model=ErasedOut,
    responses=_ERRORS,
    summary="Erase one conversation from every tier",
)
async def erase_conversation(request: Request, conversation_id: uuid.UUID) -> JSONResponse:
    gw = gateway_of(request)
    caller = await authorize(request, Action.WRITE)
    erased = await gw.pipeline.erase_conversation(str(conversation_id), principal=caller.principal)
    return _answer(erased, caller.headers)


def _answer(erased: Result[ErasureReport, Error], headers: dict[str, str]) -> JSONResponse:
    if isinstance(erased, Err):
        raise api_error(erased.error)
    return JSONResponse(_out(erased.value).model_dump(), headers=headers)


def _out(report: ErasureReport) -> ErasedOut:
    return ErasedOut(conversations=report.conversations, turns=report.turns, blobs_deleted=report.blobs_deleted)
