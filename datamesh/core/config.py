"""Configuration: one typed, immutable object built once and passed in.

:meth:`DataMeshConfig.from_env` reads the ``DATAMESH_*`` variables (each documented in the README
with its default) and returns ``Err(ConfigError)`` naming the first bad one.  Nothing else in
datamesh reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from datamesh.core.envparse import (
    _BadValue,
    _bool,
    _choice,
    _float_between,
    _fraction,
    _get,
    _int_between,
    _non_negative_float,
    _optional_path,
    _positive_float,
    _upper_choice,
    _url,
)
from datamesh.core.errors import ConfigError
from datamesh.core.result import Err, Ok, Result
from datamesh.storage.objects.config import ObjectsSettings

DEFAULT_DATA_DIR = "./datamesh-data"
DEFAULT_AP_SHARDS = 4
DEFAULT_AP_ENGINE = "sqlite"
AP_ENGINES = ("sqlite", "lsm")
#: When an LSM shard's log reaches the disk: every batch before it is acknowledged (``always``), at
#: most every ``ap_lsm_fsync_interval_s`` (``interval``: a machine crash loses that window), or
#: when the OS writes it back (``never``).
DEFAULT_AP_LSM_FSYNC = "always"
AP_LSM_FSYNC_POLICIES = ("always", "interval", "never")
DEFAULT_AP_LSM_FSYNC_INTERVAL_S = 0.05
#: How a process that does not own the AP shards (the Celery-mode pipeline, the gateway, the CLI)
#: reads them: by opening the shard files itself (``files``: it must see the owners' disk) or by
#: asking each shard's owner over the broker (``workers``: from any host).
DEFAULT_AP_READS = "files"
AP_READS = ("files", "workers")
#: How long a read routed to a shard's owner waits for its answer before failing (retryable).
DEFAULT_AP_READ_TIMEOUT_S = 10.0
DEFAULT_INLINE_MAX_BYTES = 64 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 256 * 1024 * 1024
DEFAULT_INGEST_RATE = 10_000.0
DEFAULT_INGEST_BURST = 20_000
DEFAULT_MAX_IN_FLIGHT = 1_024
DEFAULT_BACKPRESSURE = "wait"
DEFAULT_EXECUTOR = "local"
DEFAULT_TENANT = "default"
DEFAULT_IDEMPOTENCY_WAIT_S = 30.0
DEFAULT_SAGA_LEASE_S = 60.0
DEFAULT_SAGA_QUEUE_TIMEOUT_S = 600.0
DEFAULT_GATEWAY_HOST = "127.0.0.1"
DEFAULT_GATEWAY_PORT = 8080
DEFAULT_GATEWAY_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_GATEWAY_MAX_BATCH = 1_000
DEFAULT_GATEWAY_AUTH_CACHE_S = 5.0
DEFAULT_RATE_LIMIT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RATE_LIMIT_KEY_RATE = 100.0
DEFAULT_RATE_LIMIT_KEY_BURST = 200
DEFAULT_RATE_LIMIT_TENANT_RATE = 1_000.0
DEFAULT_RATE_LIMIT_TENANT_BURST = 2_000
DEFAULT_RATE_LIMIT_FAILURE = "closed"
DEFAULT_CP_REQUIRE_SYNC_REPLICATION = False
DEFAULT_CP_COMMIT_TIMEOUT_S = 30.0
DEFAULT_EMBEDDER = "none"
DEFAULT_INDEXER = "on"
DEFAULT_INDEX_INTERVAL_S = 1.0
DEFAULT_INDEX_BATCH = 200
#: How a Celery-mode process that does not write the regional indexes (the pipeline, the gateway,
#: the CLI) searches them: by opening the index files read-only itself (``files``: it must see the
#: index volume) or by asking each region's search workers over the broker (``workers``: any host).
DEFAULT_INDEX_READS = "files"
INDEX_READS = ("files", "workers")
#: How long a search routed to the search workers waits for every region's answer (one deadline
#: for the regions asked at once) before failing (retryable).
DEFAULT_SEARCH_TIMEOUT_S = 10.0
EMBEDDERS = ("none", "minilm")

BACKPRESSURE_MODES = ("wait", "reject")
EXECUTORS = ("local", "celery")
WORKER_ROLES = ("all", "cp", "blobs", "ap", "index", "search")
RATE_LIMIT_FAILURE_MODES = ("closed", "open")
RATE_LIMIT_OFF = "off"
DEFAULT_METRICS = "on"
DEFAULT_METRICS_PORT = 9464
DEFAULT_OTLP_ENDPOINT = ""
DEFAULT_TRACE_SAMPLE_RATE = 0.01
DEFAULT_LOG_FORMAT = "json"
DEFAULT_LOG_LEVEL = "INFO"
DEFAULT_SERVICE_NAME = "datamesh"

SWITCH = ("on", "off")
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RESULT_BACKEND = ""
DEFAULT_VISIBILITY_TIMEOUT_S = 3600.0
DEFAULT_STEP_MAX_DELIVERIES = 5
DEFAULT_COMPENSATION_ATTEMPTS = 6
#: Reaper passes whose re-run of a saga's pivot fails with a retryable error before the saga is
#: dead-lettered (each pass is one reap interval apart, and the CP tier re-runs each one itself).
DEFAULT_REAPER_PIVOT_ATTEMPTS = 10
DEFAULT_SHARD_LEASE_S = 30.0
DEFAULT_REAP_INTERVAL_S = 30.0
DEFAULT_SAGA_WAIT_S = 300.0
DEFAULT_STEP_TIME_LIMIT_S = 120.0
DEFAULT_WORKER_ROLE = "all"


T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class DataMeshConfig:
    """Every setting of a datamesh deployment; see the README for the matching variables."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    cp_url: str = ""
    ap_dir: Path | None = None
    ap_shards: int = DEFAULT_AP_SHARDS
    #: AP shard engine: ``sqlite`` (one keyed table a shard) or ``lsm`` (log + memtable + sorted runs)
    ap_engine: str = DEFAULT_AP_ENGINE
    #: LSM shards' log fsync policy (``always``, ``interval``, ``never``) and interval
    ap_lsm_fsync: str = DEFAULT_AP_LSM_FSYNC
    ap_lsm_fsync_interval_s: float = DEFAULT_AP_LSM_FSYNC_INTERVAL_S
    #: Where a non-owner reads AP content: the shard files (``files``) or their owners (``workers``)
    ap_reads: str = DEFAULT_AP_READS
    ap_read_timeout_s: float = DEFAULT_AP_READ_TIMEOUT_S
    objects_url: str = ""
    inline_max_bytes: int = DEFAULT_INLINE_MAX_BYTES
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    ingest_rate: float = DEFAULT_INGEST_RATE
    ingest_burst: int = DEFAULT_INGEST_BURST
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    backpressure: str = DEFAULT_BACKPRESSURE
    executor: str = DEFAULT_EXECUTOR
    tenant: str = DEFAULT_TENANT
    idempotency_wait_s: float = DEFAULT_IDEMPOTENCY_WAIT_S
    #: A running step's lease (start-to-close): a saga whose step began is reaped this long after
    #: its last sign of life.  A saga handed to a queue for its next step (Celery executor) waits up
    #: to ``saga_queue_timeout_s`` instead (schedule-to-start): a long queue is not a dead driver.
    saga_lease_s: float = DEFAULT_SAGA_LEASE_S
    saga_queue_timeout_s: float = DEFAULT_SAGA_QUEUE_TIMEOUT_S
    gateway_host: str = DEFAULT_GATEWAY_HOST
    gateway_port: int = DEFAULT_GATEWAY_PORT
    gateway_max_body_bytes: int = DEFAULT_GATEWAY_MAX_BODY_BYTES
    gateway_max_batch: int = DEFAULT_GATEWAY_MAX_BATCH
    gateway_auth_cache_s: float = DEFAULT_GATEWAY_AUTH_CACHE_S
    rate_limit_redis_url: str = DEFAULT_RATE_LIMIT_REDIS_URL
    rate_limit_key_rate: float = DEFAULT_RATE_LIMIT_KEY_RATE
    rate_limit_key_burst: int = DEFAULT_RATE_LIMIT_KEY_BURST
    rate_limit_tenant_rate: float = DEFAULT_RATE_LIMIT_TENANT_RATE
    rate_limit_tenant_burst: int = DEFAULT_RATE_LIMIT_TENANT_BURST
    rate_limit_failure: str = DEFAULT_RATE_LIMIT_FAILURE
    #: Per-region object store locations and S3 client settings; ``None``: every region in a
    #: sub-folder of :attr:`resolved_objects_url` (see ``datamesh.storage.objects.config``).
    objects: ObjectsSettings | None = None
    #: Observability (see ``datamesh.observability``): metrics are cheap and on by default; traces
    #: are made only when exported (OTLP or a JSON-lines file); logs are JSON lines.
    metrics: bool = True
    metrics_port: int = DEFAULT_METRICS_PORT
    otlp_endpoint: str = DEFAULT_OTLP_ENDPOINT
    trace_file: Path | None = None
    trace_sample_rate: float = DEFAULT_TRACE_SAMPLE_RATE
    log_format: str = DEFAULT_LOG_FORMAT
    log_level: str = DEFAULT_LOG_LEVEL
    service_name: str = DEFAULT_SERVICE_NAME
    cp_require_sync_replication: bool = DEFAULT_CP_REQUIRE_SYNC_REPLICATION
    cp_commit_timeout_s: float = DEFAULT_CP_COMMIT_TIMEOUT_S
    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str = DEFAULT_RESULT_BACKEND
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S
    step_max_deliveries: int = DEFAULT_STEP_MAX_DELIVERIES
    compensation_attempts: int = DEFAULT_COMPENSATION_ATTEMPTS
    #: A saga whose pivot the reaper re-ran this many times, each failing with a retryable error,
    #: is dead-lettered (not compensated: ``sagas retry`` re-runs the pivot).
    reaper_pivot_attempts: int = DEFAULT_REAPER_PIVOT_ATTEMPTS
    shard_lease_s: float = DEFAULT_SHARD_LEASE_S
    reap_interval_s: float = DEFAULT_REAP_INTERVAL_S
    saga_wait_s: float = DEFAULT_SAGA_WAIT_S
    step_time_limit_s: float = DEFAULT_STEP_TIME_LIMIT_S
    worker_role: str = DEFAULT_WORKER_ROLE
    worker_regions: tuple[str, ...] = ()
    worker_shards: tuple[int, ...] = ()
    #: The index tier (see ``datamesh.pipeline.indexer``): where regional indexes live, whether
    #: this process runs the background indexer, how often it polls the outbox, and how many outbox
    #: rows it takes at once; ``embedder`` computes missing embeddings (``none``: only given ones).
    index_dir: Path | None = None
    indexer: bool = True
    index_interval_s: float = DEFAULT_INDEX_INTERVAL_S
    index_batch: int = DEFAULT_INDEX_BATCH
    embedder: str = DEFAULT_EMBEDDER
    #: Where a Celery-mode reader searches: the index files (``files``) or the search workers (``workers``)
    index_reads: str = DEFAULT_INDEX_READS
    search_timeout_s: float = DEFAULT_SEARCH_TIMEOUT_S

    @property
    def tracing(self) -> bool:
        """Spans are made only when something receives them."""
        return bool(self.otlp_endpoint) or self.trace_file is not None

    @property
    def resolved_cp_url(self) -> str:
        """The CP database URL; local mode defaults to a SQLite file in ``data_dir``."""
        return self.cp_url or f"sqlite:///{(self.data_dir / 'cp.sqlite3').resolve()}"

    @property
    def resolved_ap_dir(self) -> Path:
        return self.ap_dir or self.data_dir / "ap"

    @property
    def resolved_index_dir(self) -> Path:
        return self.index_dir or self.data_dir / "index"

    @property
    def resolved_result_backend(self) -> str:
        """Celery's result backend: ``result_backend``, or else the broker's Redis.  It carries the
        answers of reads routed to the shards' owners (``ap_reads=workers``); saga tasks store no
        result (the saga log is the record)."""
        return self.result_backend or self.broker_url

    @property
    def resolved_objects_url(self) -> str:
        return self.objects_url or (self.data_dir / "objects").resolve().as_uri()

    def with_changes(self, **changes: Any) -> DataMeshConfig:
        """A copy with ``changes`` applied (for tests and embedding code)."""
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Result[DataMeshConfig, ConfigError]:
        """Build a configuration from ``DATAMESH_*`` variables (``os.environ`` by default)."""
        env = os.environ if environ is None else environ
        try:
            config = cls(
                data_dir=Path(_get(env, "DATAMESH_DATA_DIR", str, DEFAULT_DATA_DIR)),
                cp_url=_get(env, "DATAMESH_CP_URL", _url, ""),
                ap_dir=_get(env, "DATAMESH_AP_DIR", _optional_path, None),
                ap_shards=_get(env, "DATAMESH_AP_SHARDS", _int_between(1, 4096), DEFAULT_AP_SHARDS),
                ap_engine=_get(env, "DATAMESH_AP_ENGINE", _choice(AP_ENGINES), DEFAULT_AP_ENGINE),
                ap_lsm_fsync=_get(env, "DATAMESH_AP_LSM_FSYNC", _choice(AP_LSM_FSYNC_POLICIES), DEFAULT_AP_LSM_FSYNC),
                ap_lsm_fsync_interval_s=_get(
                    env,
                    "DATAMESH_AP_LSM_FSYNC_INTERVAL_S",
                    _float_between(0.001, 60.0),
                    DEFAULT_AP_LSM_FSYNC_INTERVAL_S,
                ),
                ap_reads=_get(env, "DATAMESH_AP_READS", _choice(AP_READS), DEFAULT_AP_READS),
                ap_read_timeout_s=_get(
                    env, "DATAMESH_AP_READ_TIMEOUT_S", _float_between(0.1, 3600.0), DEFAULT_AP_READ_TIMEOUT_S
                ),
                objects_url=_get(env, "DATAMESH_OBJECTS_URL", _url, ""),
                inline_max_bytes=_get(
                    env,
                    "DATAMESH_INLINE_MAX_BYTES",
                    _int_between(0, 1 << 30),
                    DEFAULT_INLINE_MAX_BYTES,
                ),
                max_payload_bytes=_get(
                    env,
                    "DATAMESH_MAX_PAYLOAD_BYTES",
                    _int_between(1, 1 << 40),
                    DEFAULT_MAX_PAYLOAD_BYTES,
                ),
                ingest_rate=_get(env, "DATAMESH_INGEST_RATE", _positive_float, DEFAULT_INGEST_RATE),
                ingest_burst=_get(
                    env,
                    "DATAMESH_INGEST_BURST",
                    _int_between(1, 1 << 40),
                    DEFAULT_INGEST_BURST,
                ),
                max_in_flight=_get(
                    env,
                    "DATAMESH_MAX_IN_FLIGHT",
                    _int_between(1, 1 << 30),
                    DEFAULT_MAX_IN_FLIGHT,
                ),
                backpressure=_get(
                    env,
                    "DATAMESH_BACKPRESSURE",
                    _choice(BACKPRESSURE_MODES),
                    DEFAULT_BACKPRESSURE,
                ),
                executor=_get(env, "DATAMESH_EXECUTOR", _choice(EXECUTORS), DEFAULT_EXECUTOR),
                tenant=_get(env, "DATAMESH_TENANT", _name, DEFAULT_TENANT),
                idempotency_wait_s=_get(
                    env,
                    "DATAMESH_IDEMPOTENCY_WAIT_S",
                    _positive_float,
                    DEFAULT_IDEMPOTENCY_WAIT_S,
                ),
                saga_lease_s=_get(env, "DATAMESH_SAGA_LEASE_S", _positive_float, DEFAULT_SAGA_LEASE_S),
                saga_queue_timeout_s=_get(
                    env, "DATAMESH_SAGA_QUEUE_TIMEOUT_S", _positive_float, DEFAULT_SAGA_QUEUE_TIMEOUT_S
                ),
                gateway_host=_get(env, "DATAMESH_GATEWAY_HOST", str, DEFAULT_GATEWAY_HOST),
                gateway_port=_get(env, "DATAMESH_GATEWAY_PORT", _int_between(0, 65535), DEFAULT_GATEWAY_PORT),
                gateway_max_body_bytes=_get(
                    env, "DATAMESH_GATEWAY_MAX_BODY_BYTES", _int_between(1024, 1 << 34), DEFAULT_GATEWAY_MAX_BODY_BYTES
                ),
                gateway_max_batch=_get(
                    env, "DATAMESH_GATEWAY_MAX_BATCH", _int_between(1, 100_000), DEFAULT_GATEWAY_MAX_BATCH
                ),
                gateway_auth_cache_s=_get(
                    env, "DATAMESH_GATEWAY_AUTH_CACHE_S", _non_negative_float, DEFAULT_GATEWAY_AUTH_CACHE_S
                ),
                rate_limit_redis_url=_get(
                    env, "DATAMESH_RATE_LIMIT_REDIS_URL", _redis_url, DEFAULT_RATE_LIMIT_REDIS_URL
                ),
                rate_limit_key_rate=_get(
                    env, "DATAMESH_RATE_LIMIT_KEY_RATE", _positive_float, DEFAULT_RATE_LIMIT_KEY_RATE
                ),
                rate_limit_key_burst=_get(
                    env, "DATAMESH_RATE_LIMIT_KEY_BURST", _int_between(1, 1 << 40), DEFAULT_RATE_LIMIT_KEY_BURST
                ),
                rate_limit_tenant_rate=_get(
                    env, "DATAMESH_RATE_LIMIT_TENANT_RATE", _positive_float, DEFAULT_RATE_LIMIT_TENANT_RATE
                ),
                rate_limit_tenant_burst=_get(
                    env,
                    "DATAMESH_RATE_LIMIT_TENANT_BURST",
                    _int_between(1, 1 << 40),
                    DEFAULT_RATE_LIMIT_TENANT_BURST,
                ),
                rate_limit_failure=_get(
                    env,
                    "DATAMESH_RATE_LIMIT_FAILURE",
                    _choice(RATE_LIMIT_FAILURE_MODES),
                    DEFAULT_RATE_LIMIT_FAILURE,
                ),
                metrics=_get(env, "DATAMESH_METRICS", _choice(SWITCH), DEFAULT_METRICS) == "on",
                metrics_port=_get(env, "DATAMESH_METRICS_PORT", _int_between(0, 65535), DEFAULT_METRICS_PORT),
                otlp_endpoint=_get(env, "DATAMESH_OTLP_ENDPOINT", _url, DEFAULT_OTLP_ENDPOINT),
                trace_file=_get(env, "DATAMESH_TRACE_FILE", _optional_path, None),
                trace_sample_rate=_get(env, "DATAMESH_TRACE_SAMPLE_RATE", _fraction, DEFAULT_TRACE_SAMPLE_RATE),
                log_format=_get(env, "DATAMESH_LOG_FORMAT", _choice(LOG_FORMATS), DEFAULT_LOG_FORMAT),
                log_level=_get(env, "DATAMESH_LOG_LEVEL", _upper_choice(LOG_LEVELS), DEFAULT_LOG_LEVEL),
                service_name=_get(env, "DATAMESH_SERVICE_NAME", _name, DEFAULT_SERVICE_NAME),
                cp_require_sync_replication=_get(
                    env,
                    "DATAMESH_CP_REQUIRE_SYNC_REPLICATION",
                    _bool,
                    DEFAULT_CP_REQUIRE_SYNC_REPLICATION,
                ),
                cp_commit_timeout_s=_get(
                    env,
                    "DATAMESH_CP_COMMIT_TIMEOUT_S",
                    _positive_float,
                    DEFAULT_CP_COMMIT_TIMEOUT_S,
                ),
                broker_url=_get(env, "DATAMESH_BROKER_URL", _url, DEFAULT_BROKER_URL),
                result_backend=_get(env, "DATAMESH_RESULT_BACKEND", _url, DEFAULT_RESULT_BACKEND),
                visibility_timeout_s=_get(
                    env, "DATAMESH_VISIBILITY_TIMEOUT_S", _positive_float, DEFAULT_VISIBILITY_TIMEOUT_S
                ),
                step_max_deliveries=_get(
                    env, "DATAMESH_STEP_MAX_DELIVERIES", _int_between(1, 1000), DEFAULT_STEP_MAX_DELIVERIES
                ),
                compensation_attempts=_get(
                    env, "DATAMESH_COMPENSATION_ATTEMPTS", _int_between(1, 1000), DEFAULT_COMPENSATION_ATTEMPTS
                ),
                reaper_pivot_attempts=_get(
                    env, "DATAMESH_REAPER_PIVOT_ATTEMPTS", _int_between(1, 1000), DEFAULT_REAPER_PIVOT_ATTEMPTS
                ),
                shard_lease_s=_get(env, "DATAMESH_SHARD_LEASE_S", _positive_float, DEFAULT_SHARD_LEASE_S),
                reap_interval_s=_get(env, "DATAMESH_REAP_INTERVAL_S", _positive_float, DEFAULT_REAP_INTERVAL_S),
                saga_wait_s=_get(env, "DATAMESH_SAGA_WAIT_S", _positive_float, DEFAULT_SAGA_WAIT_S),
                step_time_limit_s=_get(env, "DATAMESH_STEP_TIME_LIMIT_S", _positive_float, DEFAULT_STEP_TIME_LIMIT_S),
                worker_role=_get(env, "DATAMESH_WORKER_ROLE", _choice(WORKER_ROLES), DEFAULT_WORKER_ROLE),
                worker_regions=_get(env, "DATAMESH_WORKER_REGIONS", _regions, ()),
                worker_shards=_get(env, "DATAMESH_WORKER_SHARDS", parse_shards, ()),
                index_dir=_get(env, "DATAMESH_INDEX_DIR", _optional_path, None),
                indexer=_get(env, "DATAMESH_INDEXER", _choice(SWITCH), DEFAULT_INDEXER) == "on",
                index_interval_s=_get(env, "DATAMESH_INDEX_INTERVAL_S", _positive_float, DEFAULT_INDEX_INTERVAL_S),
                index_batch=_get(env, "DATAMESH_INDEX_BATCH", _int_between(1, 100_000), DEFAULT_INDEX_BATCH),
                embedder=_get(env, "DATAMESH_EMBEDDER", _choice(EMBEDDERS), DEFAULT_EMBEDDER),
                index_reads=_get(env, "DATAMESH_INDEX_READS", _choice(INDEX_READS), DEFAULT_INDEX_READS),
                search_timeout_s=_get(
                    env, "DATAMESH_SEARCH_TIMEOUT_S", _float_between(0.1, 3600.0), DEFAULT_SEARCH_TIMEOUT_S
                ),
            )
        except _BadValue as bad:
            return Err(ConfigError(bad.variable, bad.message))
        timeouts = check_saga_timeouts(config)
        if timeouts is not None:
            return Err(timeouts)
        objects = ObjectsSettings.from_env(env, default_url=config.resolved_objects_url)
        if isinstance(objects, Err):
            return objects
        return Ok(replace(config, objects=objects.value))


def check_saga_timeouts(config: DataMeshConfig) -> ConfigError | None:
    """A saga waiting in a queue must get at least the lease of a running step, or the queue
    timeout would reap it sooner than a step that began."""
    if config.saga_queue_timeout_s >= config.saga_lease_s:
        return None
    return ConfigError(
        "DATAMESH_SAGA_QUEUE_TIMEOUT_S",
        f"{config.saga_queue_timeout_s:g}s is shorter than DATAMESH_SAGA_LEASE_S={config.saga_lease_s:g}s: "
        "a saga waiting in a queue must get at least a running step's lease",
    )


def _redis_url(raw: str) -> str:
    if raw != RATE_LIMIT_OFF and not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError(f"expected redis://host:port/db or {RATE_LIMIT_OFF!r}")
    return raw


def _regions(raw: str) -> tuple[str, ...]:
    from datamesh.core.types import GeoRegion

    names = tuple(part.strip() for part in raw.split(",") if part.strip())
    known = {r.value for r in GeoRegion}
    for name in names:
        if name not in known:
            raise ValueError(f"expected regions among {', '.join(sorted(known))}")
    return names


def parse_shards(raw: str) -> tuple[int, ...]:
    """``0-3,7`` → ``(0, 1, 2, 3, 7)``: the AP shards a worker owns."""
    shards: set[int] = set()
    for part in raw.split(","):
        part = part.strip()
        if not part:
            continue
        low, _, high = part.partition("-")
        try:
            first, last = int(low), int(high or low)
        except ValueError:
            raise ValueError("expected shard numbers or ranges such as 0-3,7") from None
        if first < 0 or last < first or last > 4095:
            raise ValueError("expected shard ranges from 0 to 4095")
        shards.update(range(first, last + 1))
    return tuple(sorted(shards))


def _name(raw: str) -> str:
    if not raw.replace("-", "").replace("_", "").isalnum() or len(raw) > 64:
        raise ValueError("expected 1-64 letters, digits, '-' or '_'")
    return raw
