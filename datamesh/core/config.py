"""Configuration: one typed, immutable object built once and passed in.

:meth:`DataMeshConfig.from_env` reads the ``DATAMESH_*`` variables (each documented in the README
with its default) and returns ``Err(ConfigError)`` naming the first bad one.  Nothing else in
datamesh reads the environment.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

from datamesh.core.errors import ConfigError
from datamesh.core.result import Err, Ok, Result

DEFAULT_DATA_DIR = "./datamesh-data"
DEFAULT_AP_SHARDS = 4
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
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/0"
DEFAULT_RESULT_BACKEND = ""
DEFAULT_VISIBILITY_TIMEOUT_S = 3600.0
DEFAULT_STEP_MAX_DELIVERIES = 5
DEFAULT_COMPENSATION_ATTEMPTS = 6
DEFAULT_SHARD_LEASE_S = 30.0
DEFAULT_REAP_INTERVAL_S = 30.0
DEFAULT_SAGA_WAIT_S = 300.0
DEFAULT_STEP_TIME_LIMIT_S = 120.0
DEFAULT_WORKER_ROLE = "all"

BACKPRESSURE_MODES = ("wait", "reject")
EXECUTORS = ("local", "celery")
WORKER_ROLES = ("all", "cp", "blobs", "ap")

T = TypeVar("T")


@dataclass(frozen=True, slots=True, kw_only=True)
class DataMeshConfig:
    """Every setting of a datamesh deployment; see the README for the matching variables."""

    data_dir: Path = Path(DEFAULT_DATA_DIR)
    cp_url: str = ""
    ap_dir: Path | None = None
    ap_shards: int = DEFAULT_AP_SHARDS
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
    saga_lease_s: float = DEFAULT_SAGA_LEASE_S
    broker_url: str = DEFAULT_BROKER_URL
    result_backend: str = DEFAULT_RESULT_BACKEND
    visibility_timeout_s: float = DEFAULT_VISIBILITY_TIMEOUT_S
    step_max_deliveries: int = DEFAULT_STEP_MAX_DELIVERIES
    compensation_attempts: int = DEFAULT_COMPENSATION_ATTEMPTS
    shard_lease_s: float = DEFAULT_SHARD_LEASE_S
    reap_interval_s: float = DEFAULT_REAP_INTERVAL_S
    saga_wait_s: float = DEFAULT_SAGA_WAIT_S
    step_time_limit_s: float = DEFAULT_STEP_TIME_LIMIT_S
    worker_role: str = DEFAULT_WORKER_ROLE
    worker_regions: tuple[str, ...] = ()
    worker_shards: tuple[int, ...] = ()

    @property
    def resolved_cp_url(self) -> str:
        """The CP database URL; local mode defaults to a SQLite file in ``data_dir``."""
        return self.cp_url or f"sqlite:///{(self.data_dir / 'cp.sqlite3').resolve()}"

    @property
    def resolved_ap_dir(self) -> Path:
        return self.ap_dir or self.data_dir / "ap"

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
                shard_lease_s=_get(env, "DATAMESH_SHARD_LEASE_S", _positive_float, DEFAULT_SHARD_LEASE_S),
                reap_interval_s=_get(env, "DATAMESH_REAP_INTERVAL_S", _positive_float, DEFAULT_REAP_INTERVAL_S),
                saga_wait_s=_get(env, "DATAMESH_SAGA_WAIT_S", _positive_float, DEFAULT_SAGA_WAIT_S),
                step_time_limit_s=_get(env, "DATAMESH_STEP_TIME_LIMIT_S", _positive_float, DEFAULT_STEP_TIME_LIMIT_S),
                worker_role=_get(env, "DATAMESH_WORKER_ROLE", _choice(WORKER_ROLES), DEFAULT_WORKER_ROLE),
                worker_regions=_get(env, "DATAMESH_WORKER_REGIONS", _regions, ()),
                worker_shards=_get(env, "DATAMESH_WORKER_SHARDS", parse_shards, ()),
            )
        except _BadValue as bad:
            return Err(ConfigError(bad.variable, bad.message))
        return Ok(config)


class _BadValue(Exception):
    def __init__(self, variable: str, message: str) -> None:
        super().__init__(variable, message)
        self.variable = variable
        self.message = message


def _get(env: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    raw = env.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        return parse(raw.strip())
    except ValueError as exc:
        raise _BadValue(name, f"{exc} (got {raw!r})") from None


def _int_between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise ValueError("expected an integer") from None
        if not low <= value <= high:
            raise ValueError(f"expected an integer from {low} to {high}")
        return value

    return parse


def _positive_float(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("expected a number") from None
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError("expected a positive finite number")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        if raw not in options:
            raise ValueError(f"expected one of {', '.join(options)}")
        return raw

    return parse


def _url(raw: str) -> str:
    if "://" not in raw:
        raise ValueError("expected a URL such as scheme://...")
    return raw


def _optional_path(raw: str) -> Path | None:
    return Path(raw)


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
