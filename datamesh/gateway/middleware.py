"""The ASGI layer under every route: trace context, request id, body limit, metrics, access log.

* ``traceparent`` is continued (or a trace started) and ``X-Request-Id`` taken or made; both are
  set in :data:`datamesh.observability.context.current` for the request and echoed on the response.
* A body over ``max_body_bytes`` (by ``Content-Length`` or as streamed) is answered 413 before any
  route runs; the body is read here once and replayed to the app.
* An exception escaping a route (a bug) becomes a 500 with the request id, and is logged.
"""

from __future__ import annotations

import logging
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from datamesh.gateway.errors import error_response
from datamesh.gateway.metrics import GatewayMetrics
from datamesh.gateway.schemas import ErrorBody
from datamesh.observability import context, tracing

log = logging.getLogger("datamesh.gateway")
access_log = logging.getLogger("datamesh.gateway.access")


class GatewayMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, metrics: GatewayMetrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        ctx = context.continue_from(headers.get("traceparent"), headers.get("x-request-id"))
        token = context.start(ctx)
        started = time.perf_counter()
        status = [500]
        sent_start = [False]
        extra = [
            (b"x-request-id", ctx.request_id.encode()),
            (b"traceparent", ctx.traceparent.encode()),
        ]

        async def send_wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                sent_start[0] = True
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        self.metrics.in_flight.inc()
        # the OpenTelemetry span joins the trace the request context carries (continued or started above)
        span = tracing.continued(
            {"traceparent": ctx.traceparent},
            f"http {scope.get('method', '')}",
            **{"http.method": scope.get("method", "")},
        )
        span.__enter__()
        try:
            body = await self._read_body(scope, receive, headers)
            if body is None:
                await self._reply(
                    413,
                    ErrorBody(
                        type="payload_too_large",
                        message=f"request body exceeds {self.max_body_bytes} bytes",
                        field="body",
                    ),
                    send_wrapped,
                )
            else:
                await self.app(scope, _replay(body, receive), send_wrapped)
        except Exception:
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not sent_start[0]:
                await self._reply(500, ErrorBody(type="internal", message="internal error"), send_wrapped)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(method, route, str(status[0])).inc()
            self.metrics.latency.labels(method, route).observe(elapsed)
            access_log.log(  # a server error is always logged, whatever the level of successes
                logging.WARNING if status[0] >= 500 else logging.INFO,
                "%s %s %d %.1fms",
                method,
                scope.get("path"),
                status[0],
                elapsed * 1000,
                extra={"route": route},
            )
            if status[0] >= 500:
                tracing.set_error(f"HTTP {status[0]}")
            span.__exit__(None, None, None)  # the span's name stays generic: raw paths are unbounded
            context.end(token)

    async def _read_body(self, scope: Scope, receive: Receive, headers: dict[str, str]) -> bytes | None:
        """The whole body, or ``None`` when it is over the limit."""
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        if scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE") and declared in (None, "0"):
            return b""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)

    async def _reply(self, status: int, body: ErrorBody, send: Send) -> None:
        response = error_response(status, body)
        await response({"type": "http"}, _replay(b"", None), send)


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _replay(body: bytes, then: Receive | None) -> Receive:
    """Hand the buffered body to the app, then pass on what the client does next (a disconnect)."""
    sent = [False]

    async def receive() -> Message:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        if then is not None:
            return await then()
        return {"type": "http.disconnect"}

    return receive
