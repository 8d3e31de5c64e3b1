"""The closed set of errors datamesh returns inside ``Err``.

Every public call reports failure as one of these variants; callers match them exhaustively::

    DataMeshError (base of every variant)
    ├── ConfigError          a DATAMESH_* setting is missing or malformed
    ├── ValidationError      a request field is malformed (names the field); nothing was written
    ├── NotFound             the named object does not exist (or is not visible to the caller)
    ├── AccessDenied         the principal is unknown, expired, revoked or lacks the right
    ├── IdempotencyConflict  an idempotency key was reused with a different payload
    ├── Backpressure         the pipeline is saturated and the caller asked not to wait
    ├── IntegrityError       stored bytes do not match their SHA-256 (never returned as data)
    ├── StorageError         a tier failed (database, shard, object store); ``retryable`` says if
    │                        trying again may help; the cause is kept
    └── SagaFailed           an ingest saga failed at a step and was compensated (or dead-lettered)

Third-party exceptions are translated into these at one boundary per backend.  Use
:func:`describe` for a one-line message and ``match`` with ``assert_never`` for exhaustive handling.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeAlias, assert_never


@dataclass(frozen=True, slots=True)
class DataMeshError:
    """Base of every error variant."""

    def __str__(self) -> str:
        return describe(self)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class ConfigError(DataMeshError):
    """When: a configuration variable has a bad value."""

    variable: str
    message: str


@dataclass(frozen=True, slots=True)
class ValidationError(DataMeshError):
    """When: a request field is malformed; ``field`` names it."""

    field: str
    message: str


@dataclass(frozen=True, slots=True)
class NotFound(DataMeshError):
    """When: the object ``kind``/``key`` does not exist or is not visible to the caller."""

    kind: str
    key: str


@dataclass(frozen=True, slots=True)
class AccessDenied(DataMeshError):
    """When: the caller may not do ``action``; ``reason`` says why."""

    action: str
    reason: str


@dataclass(frozen=True, slots=True)
class IdempotencyConflict(DataMeshError):
    """When: ``key`` was first used with another payload."""

    key: str


@dataclass(frozen=True, slots=True)
class Backpressure(DataMeshError):
    """When: the pipeline is at capacity; retry after ``retry_after_s`` seconds."""

    retry_after_s: float
    reason: str


@dataclass(frozen=True, slots=True)
class IntegrityError(DataMeshError):
    """When: content read back does not hash to what the CP tier recorded."""

    what: str
    expected: str
    actual: str


@dataclass(frozen=True, slots=True)
class StorageError(DataMeshError):
    """When: tier ``tier`` failed during ``operation``; ``cause`` keeps the original message."""

    tier: str
    operation: str
    message: str
    retryable: bool = False
    cause: str = field(default="", compare=False)


@dataclass(frozen=True, slots=True)
class SagaFailed(DataMeshError):
    """When: saga ``saga_id`` failed at ``step``; its earlier steps were compensated."""

    saga_id: str
    step: str
    message: str
    dead_lettered: bool = False


Error: TypeAlias = (
    ConfigError
    | ValidationError
    | NotFound
    | AccessDenied
    | IdempotencyConflict
    | Backpressure
    | IntegrityError
    | StorageError
    | SagaFailed
)


def describe(error: Error) -> str:
    """One line for humans and logs; never includes payload content."""
    match error:
        case ConfigError(variable=v, message=m):
            return f"configuration error in {v}: {m}"
        case ValidationError(field=f, message=m):
            return f"invalid {f}: {m}"
        case NotFound(kind=k, key=key):
            return f"{k} not found: {key}"
        case AccessDenied(action=a, reason=r):
            return f"access denied for {a}: {r}"
        case IdempotencyConflict(key=k):
            return f"idempotency key {k!r} was already used with a different payload"
        case Backpressure(retry_after_s=s, reason=r):
            return f"backpressure ({r}); retry after {s:.3f}s"
        case IntegrityError(what=w, expected=e, actual=a):
            return f"integrity check failed for {w}: expected sha256 {e}, got {a}"
        case StorageError(tier=t, operation=o, message=m, retryable=r):
            return f"{t} tier failed during {o}: {m}" + (" (retryable)" if r else "")
        case SagaFailed(saga_id=s, step=st, message=m, dead_lettered=d):
            state = "dead-lettered" if d else "compensated"
            return f"saga {s} failed at step {st} and was {state}: {m}"
        case _:
            assert_never(error)
