"""Request and W3C trace context of the current call, kept in a contextvar for logs and propagation.

The gateway sets :data:`current` for each request (:func:`start`); anything running in that
request's context sees it, including pipeline work moved to threads by ``asyncio.to_thread``
(which copies context variables).  A Celery executor carries it into tasks by sending
:meth:`TraceContext.headers` with the task and calling :func:`continue_from` in the worker;
:class:`LogContextFilter` puts the ids on every log record.
"""

from __future__ import annotations

import logging
import re
import secrets
from contextvars import ContextVar, Token
from dataclasses import dataclass

_TRACEPARENT_RE = re.compile(r"^([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})$")
_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


@dataclass(frozen=True, slots=True)
class TraceContext:
    """One span of a W3C trace: ``trace_id`` (32 hex), ``span_id`` (16 hex), ``flags`` (2 hex)."""

    trace_id: str
    span_id: str
    flags: str
    request_id: str
    parent_span_id: str | None = None

    @property
    def traceparent(self) -> str:
        return f"00-{self.trace_id}-{self.span_id}-{self.flags}"

    def child(self) -> TraceContext:
        """A new span of the same trace, parented on this one."""
        return TraceContext(self.trace_id, secrets.token_hex(8), self.flags, self.request_id, self.span_id)

    def headers(self) -> dict[str, str]:
        """What to send downstream (HTTP headers, Celery task headers)."""
        return {"traceparent": self.child().traceparent, "x-request-id": self.request_id}


current: ContextVar[TraceContext | None] = ContextVar("datamesh_trace", default=None)


def parse_traceparent(value: str | None) -> tuple[str, str, str] | None:
    """``(trace_id, parent_span_id, flags)`` of a valid version-00 header, else ``None``."""
    if not value:
        return None
    match = _TRACEPARENT_RE.match(value.strip().lower())
    if match is None or match.group(1) == "ff":
        return None
    _version, trace_id, span_id, flags = match.groups()
    if trace_id == "0" * 32 or span_id == "0" * 16:
        return None
    return trace_id, span_id, flags


def continue_from(traceparent: str | None, request_id: str | None = None) -> TraceContext:
    """A new span continuing ``traceparent`` when valid, else the root span of a new trace."""
    parsed = parse_traceparent(traceparent)
    rid = request_id if request_id and _REQUEST_ID_RE.match(request_id) else secrets.token_hex(16)
    if parsed is None:
        return TraceContext(secrets.token_hex(16), secrets.token_hex(8), "01", rid)
    trace_id, parent, flags = parsed
    return TraceContext(trace_id, secrets.token_hex(8), flags, rid, parent)


def start(context: TraceContext) -> Token[TraceContext | None]:
    return current.set(context)


def end(token: Token[TraceContext | None]) -> None:
    current.reset(token)


class LogContextFilter(logging.Filter):
    """Adds ``request_id``, ``trace_id`` and ``span_id`` (``-`` outside a request) to records."""

    def filter(self, record: logging.LogRecord) -> bool:
        ctx = current.get()
        record.request_id = ctx.request_id if ctx else "-"
        record.trace_id = ctx.trace_id if ctx else "-"
        record.span_id = ctx.span_id if ctx else "-"
        return True
