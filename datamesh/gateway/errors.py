"""From datamesh errors to HTTP: one mapping, used by every route.

========================  ======  ==============================================
variant                   status  note
========================  ======  ==============================================
ValidationError           422     ``field`` names the request field
NotFound                  404     also for what another tenant owns
AccessDenied              403     (a missing or bad key is 401, before this)
IdempotencyConflict       409
Backpressure              503     ``Retry-After`` from the pipeline
StorageError              503/500 503 + ``Retry-After`` when retryable
SagaFailed                503/500 503 + ``Retry-After``: compensated, nothing kept,
                                  safe to retry; 500 once dead-lettered
IntegrityError            500     never wrong data
ConfigError               500
========================  ======  ==============================================
"""

from __future__ import annotations

import math
from typing import Any, assert_never

from fastapi.responses import JSONResponse

from datamesh.core.errors import (
    AccessDenied,
    Backpressure,
    ConfigError,
    Error,
    IdempotencyConflict,
    IntegrityError,
    NotFound,
    SagaFailed,
    StorageError,
    ValidationError,
    describe,
)
from datamesh.gateway.schemas import ErrorBody, ErrorOut
from datamesh.observability import context, logs

log = logs.logger(__name__)


class ApiError(Exception):
    """Raised inside a route to answer with ``status`` and an error body; never escapes the app."""

    def __init__(
        self,
        status: int,
        type_: str,
        message: str,
        *,
        field: str | None = None,
        retry_after_s: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = ErrorBody(type=type_, message=message, field=field, retry_after_s=retry_after_s)
        self.headers = dict(headers or {})
        if retry_after_s is not None:
            self.headers.setdefault("Retry-After", str(max(1, math.ceil(retry_after_s))))

    def response(self) -> JSONResponse:
        return error_response(self.status, self.body, self.headers)


def request_id() -> str:
    ctx = context.current.get()
    return ctx.request_id if ctx else "-"


def error_response(status: int, body: ErrorBody, headers: dict[str, str] | None = None) -> JSONResponse:
    out = ErrorOut(error=body, request_id=request_id())
    return JSONResponse(out.model_dump(), status_code=status, headers=headers)


def classify(error: Error) -> tuple[int, ErrorBody]:
    """Status and body for a pipeline error (see the table above)."""
    message = describe(error)
    match error:
        case ValidationError(field=f):
            return 422, ErrorBody(type="validation", message=message, field=f)
        case NotFound():
            return 404, ErrorBody(type="not_found", message=message)
        case AccessDenied():
            return 403, ErrorBody(type="forbidden", message=message)
        case IdempotencyConflict():
            return 409, ErrorBody(type="idempotency_conflict", message=message, field="idempotency_key")
        case Backpressure(retry_after_s=s):
            return 503, ErrorBody(type="backpressure", message=message, retry_after_s=max(s, 0.001))
        case StorageError(retryable=True):
            return 503, ErrorBody(type="unavailable", message=message, retry_after_s=1.0)
        case StorageError():
            return 500, ErrorBody(type="storage", message=message)
        case IntegrityError():
            return 500, ErrorBody(type="integrity", message=message)
        case SagaFailed(dead_lettered=False):
            return 503, ErrorBody(type="saga_failed", message=message, retry_after_s=1.0)
        case SagaFailed():
            return 500, ErrorBody(type="saga_failed", message=message)
        case ConfigError():
            return 500, ErrorBody(type="config", message=message)
        case _:
            assert_never(error)


def api_error(error: Error) -> ApiError:
    status, body = classify(error)
    if status >= 500:  # the cause of a server error is always logged (the access line has only the status)
        log.warning("answering %d %s: %s", status, body.type, body.message)
    return ApiError(status, body.type, body.message, field=body.field, retry_after_s=body.retry_after_s)


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in {
        400: "malformed JSON",
        401: "missing or bad API key",
        403: "the key's principal lacks the right",
        404: "not found, or not visible to the key's tenant",
        409: "the idempotency key was used with a different payload",
        413: "body over DATAMESH_GATEWAY_MAX_BODY_BYTES",
        422: "a field is invalid (``error.field`` names it)",
        429: "rate limited (per key or per tenant); see Retry-After",
        500: "internal failure",
        503: "backpressure or a tier unavailable; see Retry-After",
    }.items()
}
