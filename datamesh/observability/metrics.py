"""Prometheus metrics: the named metric objects every part of datamesh updates, and exposition.

Labels are ``region``, ``tier``, ``step`` and ``outcome`` only, each from a closed set (the
``GeoRegion`` values, ``cp``/``ap``/``objects``/``index``, the saga steps, ``ok``/``error`` and a few
rejection reasons): nothing per tenant, entity, saga or key.  Latencies are measured with
``time.perf_counter_ns`` and observed in seconds.

Multiprocess mode (Celery prefork pools, several gateway workers on one host): set
``PROMETHEUS_MULTIPROC_DIR`` to an empty directory *before* the processes start (prometheus-client
reads it at import) and wipe it when the whole group restarts; :func:`render` then merges every
process's files.  The turn ledger's up-down gauges use ``multiprocess_mode="sum"`` so a turn that
one process accepted and another settled (the reaper) nets out to zero; see
:mod:`datamesh.observability.ledger`.

Other components set the gauges defined here for them (queue depth, LSM state, index and
replication lag) — import the object, never define a second metric of the same name.
"""

from __future__ import annotations

import os
import threading
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    start_http_server,
)

__all__ = [
    "CONTENT_TYPE_LATEST",
    "COMPENSATIONS",
    "COMPENSATION_SECONDS",
    "INDEX_FEED_SECONDS",
    "INDEX_LAG",
    "INDEX_OUTBOX_DEPTH",
    "INGEST_ACCEPTED",
    "INGEST_CALLS",
    "INGEST_CALL_SECONDS",
    "INGEST_COMPENSATED",
    "INGEST_DEAD_LETTER",
    "INGEST_DEAD_LETTERED",
    "INGEST_DEDUPLICATED",
    "INGEST_IN_FLIGHT",
    "INGEST_PERSISTED",
    "INGEST_REJECTED",
    "LSM_COMPACTION_BACKLOG",
    "LSM_MEMTABLE_BYTES",
    "LSM_SORTED_RUNS",
    "QUEUE_DEPTH",
    "REPLICATION_LAG",
    "SAGA_LOG",
    "SAGA_OLDEST_OPEN_AGE",
    "STEPS",
    "STEP_SECONDS",
    "TIER_CALLS",
    "TIER_CALL_SECONDS",
    "TIER_ERRORS",
    "TRACE_SPANS_DROPPED",
    "enabled",
    "registry",
    "render",
    "serve",
    "set_enabled",
]

#: Seconds; from 100 µs (a cached CP read) to 30 s (a large S3 upload with retries).
LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)

_enabled = True


def enabled() -> bool:
    """Whether the data path updates metrics (``DATAMESH_METRICS``)."""
    return _enabled


def set_enabled(on: bool) -> None:
    global _enabled
    _enabled = on


# ---- the ingest ledger (turns; see ledger.py for the invariant) ---------------------------------

INGEST_ACCEPTED = Counter(
    "datamesh_ingest_accepted_turns", "Turns that entered a saga (their idempotency key was reserved).", ["region"]
)
INGEST_PERSISTED = Counter(
    "datamesh_ingest_persisted_turns", "Accepted turns whose saga committed (the CP pivot).", ["region"]
)
INGEST_COMPENSATED = Counter(
    "datamesh_ingest_compensated_turns",
    "Accepted turns whose saga failed and was fully undone (the caller got the error).",
    ["region"],
)
INGEST_DEAD_LETTERED = Counter(
    "datamesh_ingest_dead_lettered_turns", "Accepted turns whose compensation kept failing (ever).", ["region"]
)
INGEST_DEAD_LETTER = Gauge(
    "datamesh_ingest_dead_letter_turns",
    "Turns in dead-lettered sagas now (a re-driven saga leaves it).",
    ["region"],
    multiprocess_mode="sum",
)
INGEST_IN_FLIGHT = Gauge(
    "datamesh_ingest_in_flight_turns",
    "Accepted turns whose saga is neither committed, compensated nor dead (includes crashed drivers' sagas "
    "until the reaper settles them).",
    ["region"],
    multiprocess_mode="sum",
)
INGEST_DEDUPLICATED = Counter(
    "datamesh_ingest_deduplicated_turns", "Turns answered with the first result of their idempotency key.", ["region"]
)
INGEST_REJECTED = Counter(
    "datamesh_ingest_rejected_turns",
    "Turns refused before acceptance (outcome: invalid, denied, backpressure, conflict, not_found, busy, error).",
    ["region", "outcome"],
)
INGEST_CALLS = Counter("datamesh_ingest_calls", "ingest / ingest_many calls by outcome (ok, error).", ["outcome"])
INGEST_CALL_SECONDS = Histogram(
    "datamesh_ingest_call_seconds", "Latency of ingest / ingest_many calls.", buckets=LATENCY_BUCKETS
)

# ---- saga steps and compensations ---------------------------------------------------------------

STEPS = Counter("datamesh_saga_steps", "Saga step runs by step and outcome (ok, error).", ["step", "outcome"])
STEP_SECONDS = Histogram("datamesh_saga_step_seconds", "Saga step latency.", ["step"], buckets=LATENCY_BUCKETS)
COMPENSATIONS = Counter(
    "datamesh_saga_compensations", "Compensation (undo) runs by step and outcome (ok, error).", ["step", "outcome"]
)
COMPENSATION_SECONDS = Histogram(
    "datamesh_saga_compensation_seconds", "Compensation latency.", ["step"], buckets=LATENCY_BUCKETS
)
SAGA_LOG = Gauge(
    "datamesh_saga_log_sagas",
    "Sagas in the CP saga log by status (label outcome: running, compensating, committed, compensated, dead); "
    "set by the reaper and `python -m datamesh metrics`.",
    ["outcome"],
    multiprocess_mode="mostrecent",
)
SAGA_OLDEST_OPEN_AGE = Gauge(
    "datamesh_saga_oldest_open_age_seconds",
    "Age of the oldest running or compensating saga in the CP saga log (0 when none).",
    multiprocess_mode="mostrecent",
)

# ---- tiers -----------------------------------------------------------------------------------------

TIER_CALLS = Counter(
    "datamesh_tier_calls", "Calls through a tier's boundary by outcome (ok, error).", ["tier", "outcome"]
)
TIER_ERRORS = Counter("datamesh_tier_errors", "Failed calls through a tier's boundary.", ["tier"])
TIER_CALL_SECONDS = Histogram(
    "datamesh_tier_call_seconds", "Latency of calls through a tier's boundary.", ["tier"], buckets=LATENCY_BUCKETS
)

# ---- set by other components -----------------------------------------------------------------------

QUEUE_DEPTH = Gauge(
    "datamesh_queue_depth", "Messages waiting in a saga step's queue (Celery).", ["region", "step"],
    multiprocess_mode="mostrecent",
)  # fmt: skip
LSM_MEMTABLE_BYTES = Gauge(
    "datamesh_lsm_memtable_bytes", "Bytes in AP LSM memtables.", ["region"], multiprocess_mode="livesum"
)
LSM_SORTED_RUNS = Gauge("datamesh_lsm_sorted_runs", "AP LSM sorted runs.", ["region"], multiprocess_mode="livesum")
LSM_COMPACTION_BACKLOG = Gauge(
    "datamesh_lsm_compaction_backlog_bytes", "Bytes waiting for AP LSM compaction.", ["region"],
    multiprocess_mode="livesum",
)  # fmt: skip
INDEX_LAG = Gauge(
    "datamesh_index_lag_seconds", "Age of the oldest committed write not yet in the index (index outbox).", ["region"],
    multiprocess_mode="livemax",
)  # fmt: skip
INDEX_FEED_SECONDS = Histogram(
    "datamesh_index_feed_seconds", "Commit-to-searchable lag of index outbox work, by region and op.",
    ["region", "op"], buckets=LATENCY_BUCKETS,
)  # fmt: skip
INDEX_OUTBOX_DEPTH = Gauge(
    "datamesh_index_outbox_depth", "Index outbox rows not yet done, by region.", ["region"],
    multiprocess_mode="mostrecent",
)  # fmt: skip
REPLICATION_LAG = Gauge(
    "datamesh_replication_lag_seconds", "Replication lag of a tier (e.g. a PostgreSQL standby).", ["region", "tier"],
    multiprocess_mode="mostrecent",
)  # fmt: skip

TRACE_SPANS_DROPPED = Counter(
    "datamesh_trace_spans_dropped", "Spans dropped because the tail-sampling buffer was full."
)

# ---- exposition ----------------------------------------------------------------------------------


def registry() -> CollectorRegistry:
    """The registry to expose: every process's files in multiprocess mode, else this process's."""
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not directory:
        return REGISTRY
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]
    return merged


def render() -> bytes:
    """The Prometheus text exposition of :func:`registry` (serve with :data:`CONTENT_TYPE_LATEST`)."""
    return generate_latest(registry())


def serve(port: int, addr: str = "0.0.0.0") -> tuple[WSGIServer, threading.Thread]:
    """Serve ``/metrics`` on ``port`` from a daemon thread (for processes without the gateway)."""
    return start_http_server(port, addr=addr, registry=registry())
