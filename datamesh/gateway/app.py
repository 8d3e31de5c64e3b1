"""The ASGI application: :func:`create_app` builds it from a configuration.

The pipeline, the CP access control and the Redis limiter are opened in the lifespan and closed
on shutdown.  The pipeline always runs with ``backpressure="reject"`` behind the gateway: a
saturated pipeline answers 503 with ``Retry-After`` at once rather than holding HTTP requests in
an unbounded queue; nothing is accepted that is not persisted.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from datamesh.core.config import RATE_LIMIT_OFF, DataMeshConfig
from datamesh.core.errors import describe
from datamesh.core.result import Err
from datamesh.gateway.auth import Authenticator
from datamesh.gateway.errors import ApiError, error_response
from datamesh.gateway.metrics import GatewayMetrics
from datamesh.gateway.middleware import GatewayMiddleware
from datamesh.gateway.ratelimit import Bucket, RateLimiter
from datamesh.gateway.routes import ROUTERS
from datamesh.gateway.schemas import BatchIn, ConversationIn, ErrorBody
from datamesh.gateway.state import Gateway
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.storage.cp.access import AccessControl

API_VERSION = "v1"
DOCUMENTED_BODIES = (ConversationIn, BatchIn)


class StartupError(RuntimeError):
    """The gateway cannot start (a tier failed to open); the message says why."""


def create_app(config: DataMeshConfig) -> FastAPI:
    metrics = GatewayMetrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pipeline = await IngestionPipeline.create(config.with_changes(backpressure="reject"))
        if isinstance(pipeline, Err):
            raise StartupError(describe(pipeline.error))
        url = None if config.rate_limit_redis_url == RATE_LIMIT_OFF else config.rate_limit_redis_url
        limiter = RateLimiter.from_url(
            url,
            per_key=Bucket(config.rate_limit_key_rate, config.rate_limit_key_burst),
            per_tenant=Bucket(config.rate_limit_tenant_rate, config.rate_limit_tenant_burst),
            fail_open=config.rate_limit_failure == "open",
        )
        auth = Authenticator(AccessControl(pipeline.value.tiers.cp), ttl_s=config.gateway_auth_cache_s)
        app.state.gateway = Gateway(config, pipeline.value, auth, limiter, metrics)
        try:
            yield
        finally:
            await limiter.close()
            await pipeline.value.close()

    app = FastAPI(
        title="datamesh gateway",
        version="1.0",
        summary="HTTP API of datamesh: ingest and read conversations; payloads are base64",
        lifespan=lifespan,
    )
    for router in ROUTERS:
        app.include_router(router)
    app.add_exception_handler(ApiError, _api_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    app.add_middleware(GatewayMiddleware, max_body_bytes=config.gateway_max_body_bytes, metrics=metrics)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


async def _api_error(_request: Request, exc: ApiError) -> JSONResponse:
    return exc.response()


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "path", "query", "header")]
    return error_response(
        422, ErrorBody(type="validation", message=str(first.get("msg")), field=".".join(loc) or "body")
    )


async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    kind = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http")
    return error_response(exc.status_code, ErrorBody(type=kind, message=str(exc.detail)), dict(exc.headers or {}))


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's spec, plus the request bodies the routes parse themselves (to name bad fields)."""
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, summary=app.summary, routes=app.routes)
    schemas = spec.setdefault("components", {}).setdefault("schemas", {})
    for model in DOCUMENTED_BODIES:
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    spec["components"].setdefault("securitySchemes", {})["bearer"] = {"type": "http", "scheme": "bearer"}
    for path, item in spec.get("paths", {}).items():
        if path.startswith(f"/{API_VERSION}/"):
            for operation in item.values():
                operation["security"] = [{"bearer": []}]
    app.openapi_schema = spec
    return spec
