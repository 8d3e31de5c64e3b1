"""Object store settings: where each region's objects live and how the S3 client behaves.

Built once from a mapping of variables (:meth:`ObjectsSettings.from_env`) and passed in; nothing
else in the object store reads the environment.  The variables, with their defaults:

* ``DATAMESH_OBJECTS_URL`` — base location (``file:///path`` or ``s3://bucket/prefix``); each region
  gets ``<base>/<region>`` (default: supplied by the caller, ``<data_dir>/objects``).
* ``DATAMESH_OBJECTS_URL_<REGION>`` (e.g. ``DATAMESH_OBJECTS_URL_EU_WEST``) — this region's location,
  used as is instead of ``<base>/<region>`` (default: unset).
* ``DATAMESH_OBJECTS_REGIONS`` — comma-separated regions that have a store (default: every region).
  Any other region has no store: asking for it is an error, never a fallback.
* ``DATAMESH_S3_ENDPOINT_URL`` — S3 endpoint (default: ``AWS_ENDPOINT_URL_S3``, then
  ``AWS_ENDPOINT_URL``, then AWS itself).  Region from ``AWS_REGION`` / ``AWS_DEFAULT_REGION`` (or
  ``?region=`` on an ``s3://`` URL); credentials from ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``
  / ``AWS_SESSION_TOKEN`` when set, otherwise boto3's usual chain (profile, instance role).
* ``DATAMESH_S3_SINGLE_PUT_MAX_BYTES`` (100 MiB) — a ``put`` of bytes up to this size is one PUT
  (the bytes are in memory already, so multipart would only add requests and a server-side
  assembly); larger ones upload parts concurrently.  Streams always go in parts.
* ``DATAMESH_S3_UPLOAD_CONCURRENCY`` (4) — parts of one upload of bytes in flight at once (a
  stream keeps at most two in flight, so its memory stays a few parts).
* ``DATAMESH_S3_PART_BYTES`` (8 MiB), ``DATAMESH_S3_MAX_COPY_BYTES`` (5 GiB),
  ``DATAMESH_S3_RETRY_ATTEMPTS`` (5), ``DATAMESH_S3_RETRY_CAP_S`` (2.0),
  ``DATAMESH_S3_MAX_POOL_CONNECTIONS`` (10), ``DATAMESH_S3_CONNECT_TIMEOUT_S`` (5.0),
  ``DATAMESH_S3_READ_TIMEOUT_S`` (60.0).
* ``DATAMESH_OBJECTS_FOLDER_FSYNC`` (``auto``) — ``always`` fsyncs a small filesystem put's folder
  on every filesystem; ``auto`` skips it where the file's fsync commits its name (ext4, XFS, btrfs;
  see :mod:`datamesh.storage.objects.filesystem`).

Two regions may never share a location, nor may one's location contain another's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import PurePosixPath
from typing import TypeVar
from urllib.parse import parse_qs, unquote, urlparse

from datamesh.core.envparse import _BadValue, _choice, _float_between, _get, _int_between
from datamesh.core.errors import ConfigError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.retry import RetryPolicy
from datamesh.core.types import GeoRegion

MiB = 1024 * 1024
GiB = 1024 * MiB

#: S3 refuses multipart parts below 5 MiB (except the last) and above 5 GiB.
MIN_S3_PART_BYTES = 5 * MiB
MAX_S3_PART_BYTES = 5 * GiB

DEFAULT_S3_PART_BYTES = 8 * MiB
#: AWS's guidance: consider multipart above about 100 MB.
DEFAULT_S3_SINGLE_PUT_MAX_BYTES = 100 * MiB
DEFAULT_S3_UPLOAD_CONCURRENCY = 4
#: Largest object published with one CopyObject; larger ones use a multipart copy (S3's limit is 5 GiB).
DEFAULT_S3_MAX_COPY_BYTES = 5 * GiB
DEFAULT_S3_RETRY_ATTEMPTS = 5
DEFAULT_S3_RETRY_CAP_S = 2.0
DEFAULT_S3_MAX_POOL_CONNECTIONS = 10
DEFAULT_S3_CONNECT_TIMEOUT_S = 5.0
DEFAULT_S3_READ_TIMEOUT_S = 60.0

URL_VARIABLE = "DATAMESH_OBJECTS_URL"
FOLDER_FSYNC_VARIABLE = "DATAMESH_OBJECTS_FOLDER_FSYNC"
FOLDER_FSYNC_MODES = ("auto", "always")
REGIONS_VARIABLE = "DATAMESH_OBJECTS_REGIONS"

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Location:
    """One place objects live: a local folder or an S3 bucket with a key prefix."""

    scheme: str  # "file" or "s3"
    path: str  # file: absolute folder; s3: key prefix without leading or trailing "/"
    bucket: str = ""
    region_name: str | None = None

    @property
    def url(self) -> str:
        if self.scheme == "file":
            return PurePosixPath(self.path).as_uri()
        return f"s3://{self.bucket}/{self.path}" if self.path else f"s3://{self.bucket}"

    def child(self, name: str) -> Location:
        joined = f"{self.path.rstrip('/')}/{name}" if self.path else name
        return replace(self, path=joined)

    def overlaps(self, other: Location) -> bool:
        """Whether the two share objects: same medium and one path is the other or inside it."""
        if (self.scheme, self.bucket) != (other.scheme, other.bucket):
            return False
        mine, theirs = _parts(self.path), _parts(other.path)
        shorter = min(len(mine), len(theirs))
        return mine[:shorter] == theirs[:shorter]

    @classmethod
    def parse(cls, url: str, variable: str) -> Result[Location, ConfigError]:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            if parsed.netloc not in ("", "localhost"):
                return Err(ConfigError(variable, f"file URLs must be local, got host {parsed.netloc!r}"))
            path = unquote(parsed.path)
            if not path.startswith("/"):
                return Err(ConfigError(variable, f"file URLs need an absolute path, got {url!r}"))
            return Ok(cls("file", path.rstrip("/") or "/"))
        if parsed.scheme == "s3":
            if not parsed.netloc:
                return Err(ConfigError(variable, f"s3 URLs need a bucket: s3://bucket/prefix, got {url!r}"))
            region = parse_qs(parsed.query).get("region", [None])[-1]
            return Ok(cls("s3", unquote(parsed.path).strip("/"), bucket=parsed.netloc, region_name=region))
        return Err(
            ConfigError(variable, f"unsupported object store scheme {parsed.scheme!r}; expected file:// or s3://")
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class S3Settings:
    """How S3 stores talk to S3; ``None`` leaves a value to boto3's defaults."""

    endpoint_url: str | None = None
    region_name: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    part_bytes: int = DEFAULT_S3_PART_BYTES
    max_copy_bytes: int = DEFAULT_S3_MAX_COPY_BYTES
    single_put_max_bytes: int = DEFAULT_S3_SINGLE_PUT_MAX_BYTES
    upload_concurrency: int = DEFAULT_S3_UPLOAD_CONCURRENCY
    max_pool_connections: int = DEFAULT_S3_MAX_POOL_CONNECTIONS
    connect_timeout_s: float = DEFAULT_S3_CONNECT_TIMEOUT_S
    read_timeout_s: float = DEFAULT_S3_READ_TIMEOUT_S
    retry: RetryPolicy = field(
        default_factory=lambda: RetryPolicy(attempts=DEFAULT_S3_RETRY_ATTEMPTS, cap_s=DEFAULT_S3_RETRY_CAP_S)
    )

    def __post_init__(self) -> None:
        if not MIN_S3_PART_BYTES <= self.part_bytes <= MAX_S3_PART_BYTES:
            raise ValueError(f"part_bytes must be from {MIN_S3_PART_BYTES} to {MAX_S3_PART_BYTES}")
        if not MIN_S3_PART_BYTES <= self.max_copy_bytes <= MAX_S3_PART_BYTES:
            raise ValueError(f"max_copy_bytes must be from {MIN_S3_PART_BYTES} to {MAX_S3_PART_BYTES}")
        if not 0 <= self.single_put_max_bytes <= MAX_S3_PART_BYTES:
            raise ValueError(f"single_put_max_bytes must be from 0 to {MAX_S3_PART_BYTES}")
        if not 1 <= self.upload_concurrency <= 64:
            raise ValueError("upload_concurrency must be from 1 to 64")


@dataclass(frozen=True, slots=True, kw_only=True)
class ObjectsSettings:
    """Every region that has a store, its location, and the S3 client settings."""

    locations: Mapping[GeoRegion, Location]
    s3: S3Settings = field(default_factory=S3Settings)
    #: Whether filesystem stores fsync a small put's folder everywhere (``always``) or only where
    #: the file's fsync does not commit its name (``auto``).
    folder_fsync: str = "auto"

    @classmethod
    def from_url(cls, url: str, *, variable: str = URL_VARIABLE) -> Result[ObjectsSettings, ConfigError]:
        """Every region under ``<url>/<region>`` with default S3 settings."""
        return cls.from_env({URL_VARIABLE: url}, default_url=url)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], *, default_url: str) -> Result[ObjectsSettings, ConfigError]:
        """Read the variables listed in the module docstring; ``Err`` names the first bad one."""
        try:
            folder_fsync = _get(environ, FOLDER_FSYNC_VARIABLE, _choice(FOLDER_FSYNC_MODES), "auto")
            return Ok(
                cls(locations=_locations(environ, default_url), s3=_s3_settings(environ), folder_fsync=folder_fsync)
            )
        except _BadValue as bad:
            return Err(ConfigError(bad.variable, bad.message))


def region_variable(region: GeoRegion) -> str:
    """The per-region URL variable, e.g. ``DATAMESH_OBJECTS_URL_EU_WEST``."""
    return f"{URL_VARIABLE}_{region.name}"


def _locations(env: Mapping[str, str], default_url: str) -> dict[GeoRegion, Location]:
    regions = _regions(env)
    by_variable = {region_variable(r): r for r in GeoRegion}
    overrides: dict[GeoRegion, str] = {}
    for name, value in env.items():
        if name.startswith(URL_VARIABLE + "_") and value.strip():
            region = by_variable.get(name)
            if region is None:
                known = ", ".join(by_variable)
                raise _BadValue(name, f"no such region variable; known: {known}")
            if region not in regions:
                raise _BadValue(name, f"region {region.value} is not listed in {REGIONS_VARIABLE}")
            overrides[region] = value.strip()
    base_url = (env.get(URL_VARIABLE) or "").strip() or default_url
    base: Location | None = None
    if any(r not in overrides for r in regions):
        base = _unwrap(Location.parse(base_url, URL_VARIABLE))
    locations: dict[GeoRegion, Location] = {}
    for region in regions:
        if region in overrides:
            locations[region] = _unwrap(Location.parse(overrides[region], region_variable(region)))
        else:
            assert base is not None
            locations[region] = base.child(region.value)
    ordered = list(locations.items())
    for i, (first, here) in enumerate(ordered):
        for second, there in ordered[i + 1 :]:
            if here.overlaps(there):
                raise _BadValue(
                    region_variable(second),
                    f"regions {first.value} and {second.value} would share objects ({here.url} and {there.url})",
                )
    return locations


def _regions(env: Mapping[str, str]) -> list[GeoRegion]:
    raw = (env.get(REGIONS_VARIABLE) or "").strip()
    if not raw:
        return list(GeoRegion)
    regions: list[GeoRegion] = []
    for item in raw.split(","):
        parsed = GeoRegion.parse(item.strip())
        if isinstance(parsed, Err):
            raise _BadValue(REGIONS_VARIABLE, parsed.error.message)
        if parsed.value not in regions:
            regions.append(parsed.value)
    return regions


def _s3_settings(env: Mapping[str, str]) -> S3Settings:
    def opt(*names: str) -> str | None:
        for name in names:
            value = (env.get(name) or "").strip()
            if value:
                return value
        return None

    attempts = _get(env, "DATAMESH_S3_RETRY_ATTEMPTS", _int_between(1, 100), DEFAULT_S3_RETRY_ATTEMPTS)
    cap_s = _get(env, "DATAMESH_S3_RETRY_CAP_S", _float_between(0.05, 3600.0), DEFAULT_S3_RETRY_CAP_S)
    try:
        retry = RetryPolicy(attempts=attempts, cap_s=cap_s)
    except ValueError as exc:  # each value was in range alone: the policy refuses the pair (cap below base)
        raise _BadValue("DATAMESH_S3_RETRY_CAP_S", str(exc)) from None
    return S3Settings(
        endpoint_url=opt("DATAMESH_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
        region_name=opt("AWS_REGION", "AWS_DEFAULT_REGION"),
        access_key_id=opt("AWS_ACCESS_KEY_ID"),
        secret_access_key=opt("AWS_SECRET_ACCESS_KEY"),
        session_token=opt("AWS_SESSION_TOKEN"),
        part_bytes=_get(
            env, "DATAMESH_S3_PART_BYTES", _int_between(MIN_S3_PART_BYTES, MAX_S3_PART_BYTES), DEFAULT_S3_PART_BYTES
        ),
        max_copy_bytes=_get(
            env,
            "DATAMESH_S3_MAX_COPY_BYTES",
            _int_between(MIN_S3_PART_BYTES, MAX_S3_PART_BYTES),
            DEFAULT_S3_MAX_COPY_BYTES,
        ),
        single_put_max_bytes=_get(
            env,
            "DATAMESH_S3_SINGLE_PUT_MAX_BYTES",
            _int_between(0, MAX_S3_PART_BYTES),
            DEFAULT_S3_SINGLE_PUT_MAX_BYTES,
        ),
        upload_concurrency=_get(
            env, "DATAMESH_S3_UPLOAD_CONCURRENCY", _int_between(1, 64), DEFAULT_S3_UPLOAD_CONCURRENCY
        ),
        max_pool_connections=_get(
            env, "DATAMESH_S3_MAX_POOL_CONNECTIONS", _int_between(1, 1024), DEFAULT_S3_MAX_POOL_CONNECTIONS
        ),
        connect_timeout_s=_get(
            env, "DATAMESH_S3_CONNECT_TIMEOUT_S", _float_between(0.01, 3600.0), DEFAULT_S3_CONNECT_TIMEOUT_S
        ),
        read_timeout_s=_get(env, "DATAMESH_S3_READ_TIMEOUT_S", _float_between(0.01, 3600.0), DEFAULT_S3_READ_TIMEOUT_S),
        retry=retry,
    )


def _unwrap(result: Result[Location, ConfigError]) -> Location:
    if isinstance(result, Err):
        raise _BadValue(result.error.variable, result.error.message)
    return result.value


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]
