"""Trace context: W3C ``traceparent`` parsing and propagation into pipeline threads."""

from __future__ import annotations

import asyncio
import logging

import pytest

from datamesh.core.errors import ValidationError
from datamesh.core.result import Err
from datamesh.core.types import EntityId, GeoRegion
from datamesh.observability import context as tracing
from datamesh.pipeline.request import IngestionRequest, validate

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent_is_continued_with_a_new_span() -> None:
    ctx = tracing.continue_from(PARENT, "req-7")
    assert ctx.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736" and ctx.parent_span_id == "00f067aa0ba902b7"
    assert ctx.span_id != "00f067aa0ba902b7" and ctx.request_id == "req-7"
    child = ctx.headers()["traceparent"]
    assert child.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-") and child.endswith("-01")


@pytest.mark.parametrize(
    "bad",
    [None, "", "garbage", "ff-" + PARENT[3:], "00-" + "0" * 32 + "-00f067aa0ba902b7-01", PARENT.replace("-01", "-1")],
)
def test_an_invalid_traceparent_starts_a_new_trace(bad: str | None) -> None:
    ctx = tracing.continue_from(bad, "bad id with spaces")
    assert len(ctx.trace_id) == 32 and ctx.parent_span_id is None and " " not in ctx.request_id


async def test_the_context_reaches_threads_the_pipeline_runs_in(caplog: pytest.LogCaptureFixture) -> None:
    token = tracing.start(tracing.continue_from(PARENT, "req-9"))
    try:
        seen = await asyncio.to_thread(lambda: tracing.current.get())
        record = logging.LogRecord("x", logging.INFO, __file__, 1, "m", None, None)
        tracing.LogContextFilter().filter(record)
    finally:
        tracing.end(token)
    assert seen is not None and seen.request_id == "req-9"
    assert record.request_id == "req-9" and record.trace_id == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert tracing.current.get() is None


def test_embeddings_beyond_float32_are_a_validation_error() -> None:
    request = IngestionRequest(
        entity_id=EntityId.generate(), prompt=b"p", response=b"r", geo_region=GeoRegion.EU_WEST, embedding=[1e39]
    )
    checked = validate(request, max_payload_bytes=1024)
    assert isinstance(checked, Err) and isinstance(checked.error, ValidationError)
    assert checked.error.field == "embedding"
