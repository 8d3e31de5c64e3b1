"""Operational endpoints, unauthenticated: liveness, readiness, Prometheus metrics.

Keep ``/metrics`` on an internal network (the nginx config in ``deploy/`` does not route it).
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from datamesh.core.result import Err
from datamesh.gateway.metrics import CONTENT_TYPE
from datamesh.gateway.schemas import Health
from datamesh.gateway.state import gateway_of
from datamesh.observability import metrics as pipeline_metrics

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    responses={503: {"model": Health, "description": "a dependency is down"}},
    summary="Readiness: the CP database answers, and Redis when the limiter fails closed",
)
async def readyz(request: Request) -> JSONResponse:
    gw = gateway_of(request)
    checks: dict[str, str] = {}
    cp = await asyncio.to_thread(gw.pipeline.tiers.cp.ping)
    checks["cp"] = "ok" if not isinstance(cp, Err) else f"down: {cp.error}"
    if gw.limiter.enabled:
        redis_ok = await gw.limiter.ping()
        checks["redis"] = "ok" if redis_ok else "down" + (" (failing open)" if gw.limiter.fail_open else "")
    ready = checks["cp"] == "ok" and (checks.get("redis", "ok") == "ok" or gw.limiter.fail_open)
    body = Health(status="ok" if ready else "unavailable", checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    summary="Prometheus metrics",
)
async def metrics(request: Request) -> Response:
    # the gateway's HTTP metrics, then the pipeline's and tiers' (ingest ledger, saga steps, tier calls)
    body = gateway_of(request).metrics.render() + pipeline_metrics.render()
    return Response(body, media_type=CONTENT_TYPE)
