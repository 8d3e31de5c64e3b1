"""From JSON bytes to pipeline requests, with 4xx errors naming the field (never a 500)."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from pydantic import ValidationError as PydanticError

from datamesh.core.types import ConversationId, EntityId
from datamesh.gateway.errors import ApiError
from datamesh.gateway.schemas import BatchIn, ConversationIn, ErrorBody
from datamesh.pipeline.request import IngestionRequest


def parse_json(body: bytes) -> Any:
    """The decoded JSON document, or ApiError 400."""
    if not body:
        raise ApiError(400, "malformed_json", "the request body is empty; expected a JSON object", field="body")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ApiError(400, "malformed_json", f"the body is not valid JSON: {exc}", field="body") from None


def parse_batch(doc: Any, max_items: int) -> list[Any]:
    try:
        batch = BatchIn.model_validate(doc)
    except PydanticError as exc:
        raise _first(exc, "") from None
    if len(batch.items) > max_items:
        raise ApiError(422, "validation", f"{len(batch.items)} items exceed the maximum of {max_items}", field="items")
    return list(batch.items)


def parse_item(doc: Any, prefix: str = "") -> IngestionRequest | ErrorBody:
    """A pipeline request from one JSON object, or the error naming the field (``prefix`` first)."""
    try:
        item = ConversationIn.model_validate(doc)
    except PydanticError as exc:
        return _first(exc, prefix).body
    prompt = _b64(item.prompt, prefix + "prompt")
    if isinstance(prompt, ErrorBody):
        return prompt
    response = _b64(item.response, prefix + "response")
    if isinstance(response, ErrorBody):
        return response
    return IngestionRequest(
        entity_id=EntityId(item.entity_id),
        prompt=prompt,
        response=response,
        geo_region=item.geo_region,
        conversation_id=ConversationId(item.conversation_id) if item.conversation_id else None,
        idempotency_key=item.idempotency_key,
        embedding=[float(x) for x in item.embedding] if item.embedding is not None else None,
        metadata=item.metadata,
    )


def _b64(text: str, field: str) -> bytes | ErrorBody:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError):
        return ErrorBody(type="validation", message="expected standard base64", field=field)


def pydantic_error(exc: PydanticError, prefix: str) -> ApiError:
    """ApiError 422 naming the first invalid field of a pydantic validation error."""
    return _first(exc, prefix)


def _first(exc: PydanticError, prefix: str) -> ApiError:
    errors = exc.errors(include_input=False, include_url=False)
    first = errors[0] if errors else {"loc": (), "msg": "invalid"}
    loc = ".".join(str(part) for part in first["loc"])
    field = (prefix + loc) if loc else (prefix.rstrip(".") or "body")
    return ApiError(422, "validation", str(first["msg"]), field=field)
