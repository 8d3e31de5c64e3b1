"""Traces and metrics across Celery: trace context in task headers, a span per task, flushing.

* Producer side (the pipeline's executor, and workers publishing the next step of a chain, a retry
  or a compensation): ``before_task_publish`` writes the active span's W3C ``traceparent`` into
  the message headers, so one ingest is one trace whichever processes run its steps.
* Worker side: ``task_prerun`` opens a span ``task.<name>`` that continues the trace of the message
  (:func:`datamesh.observability.tracing.continued`); ``task_postrun`` closes it, marked failed when
  the task raised (state ``FAILURE``) or returned an ``Err`` or ``"dead"`` (a dead-lettered saga),
  and flushes the exporter so kept spans are written at the end of each task, not up to 5 s later.
  A retry is not an error in itself (a shard bounce is routine); a retried ``Err`` already marked its
  step's span failed, which keeps the trace.
* After fork (``worker_process_init``) each pool process configures observability for itself, with
  the service name ``worker`` unless ``DATAMESH_SERVICE_NAME`` says otherwise; at process shutdown
  it flushes its spans and, in multiprocess mode, marks itself dead for the ``live*`` gauges.

Tail sampling decides per process (see :mod:`datamesh.observability.tracing`): a task's span is
the local root of its part of the trace, so each task's part is kept or dropped on its own.
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import replace
from typing import Any

from celery.signals import before_task_publish, task_postrun, task_prerun
from opentelemetry import trace

from datamesh import observability
from datamesh.core.config import DataMeshConfig
from datamesh.core.result import Err
from datamesh.observability import tracing

__all__ = ["after_fork", "on_process_shutdown"]

WORKER_SERVICE_NAME = "worker"
_HEADERS = ("traceparent", "tracestate")

_open: dict[str, contextlib.ExitStack] = {}
_spans: dict[str, Any] = {}
_lock = threading.Lock()


def after_fork(config: DataMeshConfig) -> None:
    """Configure metrics, tracing and logs in a new pool process (never raises)."""
    if "DATAMESH_SERVICE_NAME" not in os.environ:
        config = replace(config, service_name=WORKER_SERVICE_NAME)
    with contextlib.suppress(Exception):
        tracing.forget()  # spans buffered by the parent are the parent's: never export them twice
        observability.configure(config)


def on_process_shutdown() -> None:
    with contextlib.suppress(Exception):
        tracing.shutdown()  # flush what is kept
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        with contextlib.suppress(Exception):
            multiprocess.mark_process_dead(os.getpid())


@before_task_publish.connect
def _inject(headers: dict[str, Any] | None = None, **_: Any) -> None:
    if headers is None or not tracing.enabled():
        return
    with contextlib.suppress(Exception):  # tracing never breaks a publish
        carrier: dict[str, str] = {}
        tracing.inject(carrier)
        headers.update(carrier)


def _headers_of(task: Any) -> dict[str, Any]:
    request = getattr(task, "request", None)
    found: dict[str, Any] = {}
    for key in _HEADERS:
        value = getattr(request, key, None)
        if value is None:
            nested = getattr(request, "headers", None)  # headers= given to apply_async land here
            value = nested.get(key) if isinstance(nested, dict) else None
        if value is not None:
            found[key] = value
    return found


@task_prerun.connect
def _start(task_id: str | None = None, task: Any = None, kwargs: dict[str, Any] | None = None, **_: Any) -> None:
    if task_id is None or task is None or not tracing.enabled():
        return
    try:
        attributes: dict[str, str | int | float | bool] = {"datamesh.task": str(task.name)}
        saga_id = (kwargs or {}).get("saga_id")
        if isinstance(saga_id, str):
            attributes["datamesh.saga_id"] = saga_id
        for key in ("region", "shard"):
            value = (kwargs or {}).get(key)
            if isinstance(value, str | int):
                attributes[f"datamesh.{key}"] = value
        retries = getattr(task.request, "retries", 0)
        if isinstance(retries, int):
            attributes["datamesh.retries"] = retries
        name = str(task.name).removeprefix("datamesh.")
        stack = contextlib.ExitStack()
        stack.enter_context(tracing.continued(_headers_of(task), f"task.{name}", **attributes))
        with _lock:
            _open[task_id] = stack
            _spans[task_id] = trace.get_current_span()
    except Exception:  # noqa: BLE001 - tracing never breaks a task
        return


@task_postrun.connect
def _end(task_id: str | None = None, retval: Any = None, state: str | None = None, **_: Any) -> None:
    if task_id is None:
        return
    with _lock:
        stack = _open.pop(task_id, None)
        current = _spans.pop(task_id, None)
    if stack is None:
        return
    try:
        if current is not None:
            if state is not None:
                current.set_attribute("datamesh.task_state", state)
            if state == "FAILURE":
                tracing.set_error(_describe(retval), current)
            elif isinstance(retval, Err):
                tracing.set_error(type(retval.error).__name__, current)
            elif retval == "dead":
                tracing.set_error("dead-lettered", current)
        stack.close()
        tracing.force_flush()
    except Exception:  # noqa: BLE001 - tracing never breaks a task
        return


def _describe(retval: Any) -> str:
    if isinstance(retval, BaseException):
        return f"{type(retval).__name__}: {retval}"
    return "task failed"
