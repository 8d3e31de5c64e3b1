"""JSON-lines logs carrying trace, span, saga and conversation ids; successes sampled like traces.

Each record is one line: ``time``, ``level``, ``logger``, ``message``, ``trace_id``, ``span_id``,
``saga_id``, ``conversation_id`` (and ``error`` for an exception: its type and message, never a
traceback's locals).  datamesh never logs payload content: messages name ids, steps and counts.

Sampling: WARNING and above always pass.  Lower records inside a trace are held by the tail sampler
and written only if the trace is kept (same decision as its spans); outside a trace (tracing off)
they pass when the saga id (or, lacking one, a random draw) falls under the sample rate.

The saga and conversation ids live in context variables set by the pipeline (:func:`bind`), so they
follow ``asyncio`` tasks and ``asyncio.to_thread`` calls.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import logging
import random
import sys
import time
from collections.abc import Iterator
from typing import TextIO

from datamesh.observability import context, tracing

__all__ = ["ContextFilter", "JsonFormatter", "SamplingFilter", "bind", "install", "logger"]

SAGA_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("datamesh_saga_id", default=None)
CONVERSATION_ID: contextvars.ContextVar[str | None] = contextvars.ContextVar("datamesh_conversation_id", default=None)

_RELEASED = "_datamesh_released"
_HANDLER_NAME = "datamesh-json"


def logger(name: str) -> logging.Logger:
    return logging.getLogger(name)


@contextlib.contextmanager
def bind(*, saga_id: str | None = None, conversation_id: str | None = None) -> Iterator[None]:
    """Set the ids that log records made inside the block carry."""
    tokens = []
    if saga_id is not None:
        tokens.append((SAGA_ID, SAGA_ID.set(saga_id)))
    if conversation_id is not None:
        tokens.append((CONVERSATION_ID, CONVERSATION_ID.set(conversation_id)))
    try:
        yield
    finally:
        for var, token in reversed(tokens):
            var.reset(token)


class ContextFilter(logging.Filter):
    """Copies the ids from the context onto the record (never filters anything out)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request = context.current.get()  # the gateway's request, when there is one
        if not hasattr(record, "request_id"):
            record.request_id = request.request_id if request is not None else None
        if not hasattr(record, "trace_id"):
            ids = tracing.current_ids()
            if ids is None and request is not None:
                ids = (request.trace_id, request.span_id)
            record.trace_id, record.span_id = ids if ids else (None, None)
        if getattr(record, "saga_id", None) is None:
            record.saga_id = SAGA_ID.get()
        if getattr(record, "conversation_id", None) is None:
            record.conversation_id = CONVERSATION_ID.get()
        return True


class SamplingFilter(logging.Filter):
    """Errors always; successes with their trace (tail sampling) or at ``rate`` outside traces."""

    def __init__(self, handler: logging.Handler, rate: float) -> None:
        super().__init__()
        self.handler = handler
        self.rate = rate

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING or getattr(record, _RELEASED, False):
            return True
        try:
            sampler = tracing.sampler()
            trace_id = getattr(record, "trace_id", None)
            if sampler is not None and trace_id:

                def release(record: logging.LogRecord = record) -> None:
                    setattr(record, _RELEASED, True)
                    self.handler.handle(record)

                return not sampler.hold_log(int(trace_id, 16), release)
            saga = getattr(record, "saga_id", None)
            if saga:
                draw = int.from_bytes(hashlib.blake2b(saga.encode(), digest_size=8).digest(), "big") / 2**64
                return draw < self.rate
            return random.random() < self.rate
        except Exception:  # noqa: BLE001 - logging never breaks the data path
            return False


class JsonFormatter(logging.Formatter):
    """One JSON object per line; UTC ISO-8601 time with milliseconds."""

    def format(self, record: logging.LogRecord) -> str:
        created = time.gmtime(record.created)
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", created) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": getattr(record, "request_id", None),
            "trace_id": getattr(record, "trace_id", None),
            "span_id": getattr(record, "span_id", None),
            "saga_id": getattr(record, "saga_id", None),
            "conversation_id": getattr(record, "conversation_id", None),
        }
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            line["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


_TEXT_FORMAT = (
    "%(asctime)s %(levelname)s %(name)s [request=%(request_id)s trace=%(trace_id)s saga=%(saga_id)s] %(message)s"
)


def install(
    *, level: str = "INFO", fmt: str = "json", sample_rate: float = 0.01, stream: TextIO | None = None
) -> logging.Handler:
    """Attach the datamesh handler to the ``datamesh`` logger (replacing an earlier one); returns it."""
    root = logging.getLogger("datamesh")
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(_TEXT_FORMAT))
    handler.addFilter(ContextFilter())
    handler.addFilter(SamplingFilter(handler, sample_rate))
    root.addHandler(handler)
    root.setLevel(level)
    root.propagate = False
    return handler
