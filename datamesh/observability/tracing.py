"""OpenTelemetry traces: spans, W3C context propagation, tail sampling.

Spans are made only when :func:`setup` installed a tracer (``DATAMESH_OTLP_ENDPOINT`` or
``DATAMESH_TRACE_FILE`` set); otherwise :func:`span` costs one attribute read and yields ``None``.
Attributes are ids, regions, tiers, steps and counts — never payload content.

Propagation across processes (Celery task headers, HTTP headers)::

    headers = tracing.inject({})                 # producer: {"traceparent": "00-…-…-01", …}
    with tracing.continued(headers, "task.write_ap", step="write_ap"):
        ...                                      # consumer: a child of the producer's span

Tail sampling (:class:`TailSamplingProcessor`): a trace's spans are held in memory until its
*local root* (a span without a parent, or whose parent is remote) ends; then they are all exported
if any of them failed, otherwise only when the trace id falls under ``DATAMESH_TRACE_SAMPLE_RATE``.
The success decision is a deterministic function of the trace id (as OpenTelemetry's
``TraceIdRatioBased``), so every process keeps or drops the same successful traces.  Caveat: each
process decides for its own spans.  A failure in a worker keeps the worker's part; the producer's part
is kept too when the failure reaches it (an error result marks its span), but a failure the producer
never hears of (a retried task that finally succeeded) leaves only the worker's part of that trace.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Span, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from datamesh.observability import metrics

__all__ = [
    "JsonLinesSpanExporter",
    "TailSamplingProcessor",
    "continued",
    "current_ids",
    "enabled",
    "extract",
    "force_flush",
    "forget",
    "inject",
    "keep_success",
    "set_error",
    "setup",
    "shutdown",
    "span",
]

DEFAULT_MAX_TRACES = 4096
DEFAULT_MAX_SPANS_PER_TRACE = 1024

_PROPAGATOR = TraceContextTextMapPropagator()
_tracer: trace.Tracer | None = None
_provider: TracerProvider | None = None
_sampler: TailSamplingProcessor | None = None


def enabled() -> bool:
    return _tracer is not None


@contextlib.contextmanager
def span(name: str, **attributes: str | int | float | bool) -> Iterator[Span | None]:
    """A span named ``name`` around the block (``None`` when tracing is off).

    An exception leaving the block marks the span failed and propagates; call :func:`set_error`
    for a failure returned as ``Err``.
    """
    tracer = _tracer
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, attributes=attributes) as current:
        yield current


def set_error(description: str, current: Span | None = None) -> None:
    """Mark ``current`` (default: the active span) failed: its whole trace will be kept."""
    target = current if current is not None else trace.get_current_span()
    if target.is_recording():
        target.set_status(Status(StatusCode.ERROR, description[:500]))


def inject(headers: MutableMapping[str, str] | None = None) -> MutableMapping[str, str]:
    """Write the active span's W3C ``traceparent`` (and ``tracestate``) into ``headers``."""
    carrier: MutableMapping[str, str] = {} if headers is None else headers
    _PROPAGATOR.inject(carrier)
    return carrier


def extract(headers: Mapping[str, Any] | None) -> otel_context.Context:
    """The context carried by ``headers`` (an empty context when there is none)."""
    carrier = {k: str(v) for k, v in (headers or {}).items() if k in ("traceparent", "tracestate")}
    return _PROPAGATOR.extract(carrier)


@contextlib.contextmanager
def continued(headers: Mapping[str, Any] | None, name: str, **attributes: str | int | float | bool) -> Iterator[None]:
    """Run the block in a span that continues the trace carried by ``headers`` (a Celery task, a request)."""
    token = otel_context.attach(extract(headers))
    try:
        with span(name, **attributes):
            yield
    finally:
        otel_context.detach(token)


def current_ids() -> tuple[str, str] | None:
    """``(trace_id, span_id)`` in hex of the active span, if any."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def keep_success(trace_id: int, rate: float) -> bool:
    """Whether a successful trace is kept: the same answer in every process for one trace id."""
    return (trace_id & 0xFFFF_FFFF_FFFF_FFFF) < rate * (1 << 64)


class _Buffer:
    __slots__ = ("error", "logs", "spans")

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []
        self.logs: list[Callable[[], None]] = []
        self.error = False


class TailSamplingProcessor(SpanProcessor):
    """Buffers each trace's spans until its local root ends, then forwards all of them or none.

    Buffered log records (see :mod:`datamesh.observability.logs`) follow the same decision.  Memory
    is bounded: beyond ``max_traces`` open traces the oldest is dropped (counted in
    ``datamesh_trace_spans_dropped_total``), as are spans beyond ``max_spans_per_trace``.
    """

    def __init__(
        self,
        downstream: SpanProcessor,
        *,
        rate: float,
        max_traces: int = DEFAULT_MAX_TRACES,
        max_spans_per_trace: int = DEFAULT_MAX_SPANS_PER_TRACE,
    ) -> None:
        self.downstream = downstream
        self.rate = rate
        self.max_traces = max_traces
        self.max_spans_per_trace = max_spans_per_trace
        self._traces: OrderedDict[int, _Buffer] = OrderedDict()
        self._lock = threading.Lock()

    def on_start(self, span: Span, parent_context: otel_context.Context | None = None) -> None:
        return None

    def on_end(self, span: ReadableSpan) -> None:
        try:
            self._on_end(span)
        except Exception:  # noqa: BLE001 - tracing never breaks the data path
            metrics.TRACE_SPANS_DROPPED.inc()

    def _on_end(self, span: ReadableSpan) -> None:
        context = span.context
        if context is None:
            return
        root = span.parent is None or span.parent.is_remote
        with self._lock:
            buffer = self._buffer(context.trace_id)
            if len(buffer.spans) < self.max_spans_per_trace:
                buffer.spans.append(span)
            else:
                metrics.TRACE_SPANS_DROPPED.inc()
            if span.status.status_code == StatusCode.ERROR:
                buffer.error = True
            if not root:
                return
            del self._traces[context.trace_id]
        keep = buffer.error or keep_success(context.trace_id, self.rate)
        if keep:
            for done in buffer.spans:
                self.downstream.on_end(done)
            for release in buffer.logs:
                release()

    def _buffer(self, trace_id: int) -> _Buffer:
        buffer = self._traces.get(trace_id)
        if buffer is None:
            buffer = self._traces[trace_id] = _Buffer()
            while len(self._traces) > self.max_traces:
                _, evicted = self._traces.popitem(last=False)
                metrics.TRACE_SPANS_DROPPED.inc(len(evicted.spans))
        return buffer

    def hold_log(self, trace_id: int, release: Callable[[], None]) -> bool:
        """Hold a success log record until the trace's decision; False when the trace is not open here."""
        with self._lock:
            buffer = self._traces.get(trace_id)
            if buffer is None:
                buffer = self._buffer(trace_id)  # the root is still running: it has not ended yet
            if len(buffer.logs) >= self.max_spans_per_trace:
                return True  # bounded: drop it, as sampling would
            buffer.logs.append(release)
            return True

    def shutdown(self) -> None:
        self.downstream.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self.downstream.force_flush(timeout_millis)


class JsonLinesSpanExporter(SpanExporter):
    """Appends one JSON object per span to a file (``DATAMESH_TRACE_FILE``); safe across processes."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = "".join(json.dumps(_span_record(s), separators=(",", ":")) + "\n" for s in spans)
        try:
            with self._lock, self.path.open("a", encoding="utf-8") as out:
                out.write(lines)  # one write per batch: O_APPEND keeps processes' lines whole
        except OSError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _span_record(s: ReadableSpan) -> dict[str, Any]:
    ctx = s.context
    return {
        "name": s.name,
        "trace_id": format(ctx.trace_id, "032x") if ctx else None,
        "span_id": format(ctx.span_id, "016x") if ctx else None,
        "parent_span_id": format(s.parent.span_id, "016x") if s.parent else None,
        "parent_remote": bool(s.parent and s.parent.is_remote),
        "start_ns": s.start_time,
        "end_ns": s.end_time,
        "status": s.status.status_code.name,
        "attributes": dict(s.attributes or {}),
        "service": (s.resource.attributes.get("service.name") if s.resource else None),
    }


def setup(
    *,
    service_name: str,
    sample_rate: float,
    otlp_endpoint: str = "",
    trace_file: Path | None = None,
    exporter: SpanExporter | None = None,
) -> None:
    """Install the tracer: tail sampling in front of a batch exporter (OTLP, a file, or ``exporter``).

    Nothing is installed when no exporter is configured.  Calling it again replaces the tracer.
    """
    global _tracer, _provider, _sampler
    shutdown()
    exporters: list[SpanExporter] = []
    if exporter is not None:
        exporters.append(exporter)
    if trace_file is not None:
        exporters.append(JsonLinesSpanExporter(trace_file))
    if otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporters.append(OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces"))
    if not exporters:
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    for each in exporters:
        sampler = TailSamplingProcessor(BatchSpanProcessor(each), rate=sample_rate)
        provider.add_span_processor(sampler)
        _sampler = _sampler or sampler
    _provider = provider
    _tracer = provider.get_tracer("datamesh")


def sampler() -> TailSamplingProcessor | None:
    return _sampler


def force_flush() -> None:
    if _provider is not None:
        _provider.force_flush()


def forget() -> None:
    """Drop the tracer without flushing it: in a forked child, whose inherited spans are the parent's."""
    global _tracer, _provider, _sampler
    _provider, _tracer, _sampler = None, None, None


def shutdown() -> None:
    """Flush and remove the tracer (spans are no longer made)."""
    global _tracer, _provider, _sampler
    provider, _provider, _tracer, _sampler = _provider, None, None, None
    if provider is not None:
        provider.shutdown()
