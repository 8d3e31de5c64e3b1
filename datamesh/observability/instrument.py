"""Instrumentation used by the tier boundaries and the saga: one metric + span helper per kind of call.

* :func:`tier_call` wraps a call through a tier's translation boundary (``CpDatabase.run``,
  ``ContentStore``, ``ObjectStore``): ``datamesh_tier_calls_total{tier,outcome}``, errors, latency,
  and a span ``<tier>.<operation>``.
* :func:`saga_step` decorates a saga step or compensation (a function returning ``Result``):
  ``datamesh_saga_steps_total`` / ``datamesh_saga_compensations_total``, latency, a span
  ``saga.<step>`` carrying the saga id, and the saga id bound for logs.

Both swallow their own failures: observability never raises into the data path.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, ParamSpec, TypeVar

from datamesh.core.result import Err, Result
from datamesh.observability import logs, metrics, tracing

P = ParamSpec("P")
R = TypeVar("R", bound=Result[Any, Any])


class Call:
    """What a :func:`tier_call` block reports: call :meth:`check` with the boundary's ``Result``."""

    __slots__ = ("failed", "span")

    def __init__(self, span: Any) -> None:
        self.span = span
        self.failed = False

    def check(self, result: R) -> R:
        if isinstance(result, Err):
            self.failed = True
            if self.span is not None:
                tracing.set_error(type(result.error).__name__, self.span)
        return result


class _TierCall:
    """The context manager behind :func:`tier_call`: a plain class, not a generator, because it
    wraps every object get and put (a generator-based one cost about as much as a 4 KiB read)."""

    __slots__ = ("call", "operation", "region", "span", "started", "tier")

    def __init__(self, tier: str, operation: str, region: str | None) -> None:
        self.tier = tier
        self.operation = operation
        self.region = region
        self.span: AbstractContextManager[Any] | None = None
        self.call = Call(None)
        self.started = 0

    def __enter__(self) -> Call:
        self.started = time.perf_counter_ns()
        if tracing.enabled():
            attributes: dict[str, str] = {"datamesh.tier": self.tier, "datamesh.operation": self.operation}
            if self.region is not None:
                attributes["datamesh.region"] = self.region
            self.span = tracing.span(f"{self.tier}.{self.operation}", **attributes)
            self.call.span = self.span.__enter__()
        return self.call

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is not None:
            self.call.failed = True
        try:
            if self.span is not None:
                self.span.__exit__(exc_type, exc, tb)
        finally:
            if metrics.enabled():
                _record(self.tier, self.call.failed, (time.perf_counter_ns() - self.started) / 1e9)


def tier_call(tier: str, operation: str, region: str | None = None) -> AbstractContextManager[Call]:
    """Count, time and trace one call through ``tier``'s boundary; an exception counts as an error."""
    return _TierCall(tier, operation, region)


#: The labelled metric children of each tier: ``labels()`` takes a lock and builds a key every call.
_CHILDREN: dict[str, tuple[Any, Any, Any, Any]] = {}


def _record(tier: str, failed: bool, seconds: float) -> None:
    children = _CHILDREN.get(tier)
    if children is None:
        children = _CHILDREN[tier] = (
            metrics.TIER_CALLS.labels(tier, "ok"),
            metrics.TIER_CALLS.labels(tier, "error"),
            metrics.TIER_ERRORS.labels(tier),
            metrics.TIER_CALL_SECONDS.labels(tier),
        )
    ok, error, errors, latency = children
    if failed:
        error.inc()
        errors.inc()
    else:
        ok.inc()
    latency.observe(seconds)


def _saga_id_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    saga_id = kwargs.get("saga_id")
    if isinstance(saga_id, str):
        return saga_id
    for arg in args:
        found = getattr(arg, "saga_id", None)
        if isinstance(found, str):
            return found
    return None


def saga_step(step: str, *, compensation: bool = False) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Decorate a step (or, with ``compensation``, an undo) that returns a ``Result``."""
    counter = metrics.COMPENSATIONS if compensation else metrics.STEPS
    histogram = metrics.COMPENSATION_SECONDS if compensation else metrics.STEP_SECONDS
    name = f"saga.{'undo_' if compensation else ''}{step}"

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            saga_id = _saga_id_of(args, kwargs)
            started = time.perf_counter_ns()
            failed = True
            attributes = {"datamesh.step": step}
            if saga_id is not None:
                attributes["datamesh.saga_id"] = saga_id
            try:
                with logs.bind(saga_id=saga_id), tracing.span(name, **attributes) as current:
                    result = fn(*args, **kwargs)
                    failed = isinstance(result, Err)
                    if current is not None:
                        _annotate(current, result, failed)
                    return result
            finally:
                if metrics.enabled():
                    counter.labels(step, "error" if failed else "ok").inc()
                    histogram.labels(step).observe((time.perf_counter_ns() - started) / 1e9)

        return wrapper

    return decorate


def _annotate(current: Any, result: Result[Any, Any], failed: bool) -> None:
    if failed:
        error = result.error
        tracing.set_error(type(error).__name__, current)
        return
    plan = getattr(result.value, "plan", None)  # type: ignore[union-attr]
    saga_id = getattr(plan, "saga_id", None)
    if isinstance(saga_id, str) and plan is not None and plan.items:
        current.set_attribute("datamesh.saga_id", saga_id)
        current.set_attribute("datamesh.turns", len(plan.items))
