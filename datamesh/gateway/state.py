"""What every request handler reaches: the pipeline, the authenticator, the limiter, the metrics.

Instances hold no request state of their own (all of it is in the CP tier and Redis), so any
number of them can run behind a load balancer.
"""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Request

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import AccessDenied
from datamesh.core.principal import Action, Principal
from datamesh.core.result import Err
from datamesh.gateway.auth import Authenticator
from datamesh.gateway.errors import ApiError, api_error
from datamesh.gateway.metrics import GatewayMetrics
from datamesh.gateway.ratelimit import Decision, RateLimiter
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.storage.cp.access import Authenticated


@dataclass(slots=True)
class Gateway:
    config: DataMeshConfig
    pipeline: IngestionPipeline
    auth: Authenticator
    limiter: RateLimiter
    metrics: GatewayMetrics


@dataclass(frozen=True, slots=True)
class Caller:
    """An authenticated request: its key, principal and the rate-limit headers to send back."""

    key_id: str
    principal: Principal
    headers: dict[str, str]


def gateway_of(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


async def authorize(request: Request, action: Action, cost: int = 1) -> Caller:
    """Authenticate the bearer key, check ``action``, then take ``cost`` tokens; else raise ApiError."""
    return await rate_limit(request, await authenticate(request, action), cost)


async def authenticate(request: Request, action: Action) -> Authenticated:
    """The key's identity if it is valid (else 401) and its principal may do ``action`` (else 403)."""
    gw = gateway_of(request)
    found = await gw.auth.authenticate(request.headers.get("authorization"))
    if isinstance(found, Err):
        if isinstance(found.error, AccessDenied):
            gw.metrics.auth_failures.labels("401").inc()
            raise ApiError(401, "unauthorized", found.error.reason, headers={"WWW-Authenticate": "Bearer"})
        raise api_error(found.error)
    who = found.value
    if not who.principal.can(action):
        gw.metrics.auth_failures.labels("403").inc()
        raise ApiError(403, "forbidden", f"principal {who.principal.name!r} may not {action.value}")
    return who


async def rate_limit(request: Request, who: Authenticated, cost: int) -> Caller:
    """Take ``cost`` tokens from the key's and the tenant's buckets, else raise 429 (or 503)."""
    gw = gateway_of(request)
    decision = await gw.limiter.check(who.key_id, who.principal.tenant, cost)
    if not decision.allowed:
        raise _limited(gw, decision)
    return Caller(who.key_id, who.principal, decision.headers())


def _limited(gw: Gateway, decision: Decision) -> ApiError:
    gw.metrics.rate_limited.labels(decision.scope).inc()
    if decision.unavailable:
        return ApiError(
            503,
            "rate_limiter_unavailable",
            "the rate limiter is unavailable and configured to fail closed",
            retry_after_s=decision.retry_after_s,
            headers=decision.headers(),
        )
    return ApiError(
        429,
        "rate_limited",
        f"rate limit of the {decision.scope} exceeded",
        retry_after_s=decision.retry_after_s,
        headers=decision.headers(),
    )
