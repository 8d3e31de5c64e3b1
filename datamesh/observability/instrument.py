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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


@contextmanager
def tier_call(tier: str, operation: str, region: str | None = None) -> Iterator[Call]:
    """Count, time and trace one call through ``tier``'s boundary; an exception counts as an error."""
    started = time.perf_counter_ns()
    attributes: dict[str, str] = {"datamesh.tier": tier, "datamesh.operation": operation}
    if region is not None:
        attributes["datamesh.region"] = region
    call = Call(None)
    try:
        with tracing.span(f"{tier}.{operation}", **attributes) as current:
            call.span = current
            yield call
    except BaseException:
        call.failed = True
        raise
    finally:
        if metrics.enabled():
            outcome = "error" if call.failed else "ok"
            metrics.TIER_CALLS.labels(tier, outcome).inc()
            if call.failed:
                metrics.TIER_ERRORS.labels(tier).inc()
            metrics.TIER_CALL_SECONDS.labels(tier).observe((time.perf_counter_ns() - started) / 1e9)


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
