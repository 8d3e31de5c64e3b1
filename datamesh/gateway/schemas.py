"""The JSON shapes of the HTTP API (``/v1``); binary payloads travel as standard base64."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr

from datamesh.core.types import GeoRegion
from datamesh.pipeline.request import (
    MAX_EMBEDDING_ABS,
    MAX_EMBEDDING_DIM,
    MAX_IDEMPOTENCY_KEY_CHARS,
    MAX_METADATA_ITEMS,
)

BASE64 = r"^(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?$"


_B64: dict[str, Any] = {"contentEncoding": "base64"}
Component = Annotated[StrictFloat | StrictInt, Field(ge=-MAX_EMBEDDING_ABS, le=MAX_EMBEDDING_ABS)]


class ConversationIn(BaseModel):
    """One turn to ingest.  Leave out ``conversation_id`` to start a conversation."""

    model_config = ConfigDict(extra="forbid")

    entity_id: uuid.UUID = Field(description="owner of the conversation (a UUID)")
    prompt: StrictStr = Field(
        min_length=4, pattern=BASE64, description="the prompt (not empty), base64", json_schema_extra=_B64
    )
    response: StrictStr = Field(default="", pattern=BASE64, description="the response, base64", json_schema_extra=_B64)
    geo_region: GeoRegion = Field(description="where the content is kept")
    conversation_id: uuid.UUID | None = Field(default=None, description="append to this conversation")
    idempotency_key: StrictStr | None = Field(default=None, min_length=1, max_length=MAX_IDEMPOTENCY_KEY_CHARS)
    embedding: list[Component] | None = Field(default=None, min_length=1, max_length=MAX_EMBEDDING_DIM)
    metadata: dict[StrictStr, StrictStr] | None = Field(default=None, max_length=MAX_METADATA_ITEMS)


class BatchIn(BaseModel):
    """Many turns, one saga; each item has the shape of ``ConversationIn`` and its own result."""

    model_config = ConfigDict(extra="forbid")

    items: list[dict[str, Any]] = Field(min_length=1, description="objects shaped like ConversationIn")


class Ingested(BaseModel):
    conversation_id: str
    turn_id: str
    turn_seq: int
    saga_id: str
    deduplicated: bool
    latency_ms: float


class ErrorBody(BaseModel):
    type: str = Field(description="error variant, e.g. validation, not_found, rate_limited")
    message: str
    field: str | None = Field(default=None, description="the request field at fault, when there is one")
    retry_after_s: float | None = None


class ErrorOut(BaseModel):
    error: ErrorBody
    request_id: str


class BatchItemOut(BaseModel):
    index: int
    status: int = Field(description="the HTTP status this item would have had on its own")
    result: Ingested | None = None
    error: ErrorBody | None = None


class BatchOut(BaseModel):
    accepted: int
    rejected: int
    items: list[BatchItemOut]


class TurnOut(BaseModel):
    seq: int
    turn_id: str
    prompt: str = Field(description="base64")
    response: str = Field(description="base64")
    embedding: list[float] | None
    metadata: dict[str, str]
    prompt_sha256: str
    response_sha256: str
    created_at: str


class ConversationOut(BaseModel):
    conversation_id: str
    entity_id: str
    geo_region: str
    created_at: str
    turns: list[TurnOut]


class Health(BaseModel):
    status: str
    checks: dict[str, str] = Field(default_factory=dict)


class SearchIn(BaseModel):
    """A search by words, by vector, or both (``POST /v1/search``); the same filters as ``GET``."""

    model_config = ConfigDict(extra="forbid")

    text: StrictStr | None = Field(default=None, min_length=1, max_length=4096, description="words to find")
    vector: list[Component] | None = Field(
        default=None, min_length=1, max_length=MAX_EMBEDDING_DIM, description="a query embedding"
    )
    entity_id: uuid.UUID | None = None
    region: GeoRegion | None = Field(default=None, description="one region (default: every indexed region)")
    since: str | None = Field(default=None, description="ISO 8601 with a time zone, inclusive")
    until: str | None = Field(default=None, description="ISO 8601 with a time zone, exclusive")
    limit: StrictInt = Field(default=10, ge=1, le=1000)


class SearchHitOut(BaseModel):
    conversation_id: str
    turn_id: str
    turn_seq: int
    entity_id: str
    geo_region: str
    score: float = Field(description="higher is better: negated BM25 (text), cosine (vector), RRF (both)")
    snippet: str


class SearchOut(BaseModel):
    hits: list[SearchHitOut]


class ErasedOut(BaseModel):
    conversations: list[str] = Field(description="conversations erased by this call (empty: nothing left)")
    turns: int
    blobs_deleted: int
