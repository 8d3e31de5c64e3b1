"""Observability: Prometheus metrics, OpenTelemetry traces with tail sampling, JSON-lines logs.

::

    metrics.py     the named metric objects (import them; never redefine a name), render(), serve()
    ledger.py      the no-loss invariant: accepted = persisted + compensated + dead-lettered + in flight
    tracing.py     span(), inject()/extract()/continued() for W3C trace context, tail sampling
    logs.py        JSON formatter, id-carrying and sampling filters, bind() for saga/conversation ids
    instrument.py  tier_call() and saga_step(): what the tier boundaries and saga steps use

:func:`configure` applies a :class:`~datamesh.core.config.DataMeshConfig` to this process (metrics
on/off, the tracer, the log handler).  Everything is cheap when off and never raises into the data path.
"""

from __future__ import annotations

import logging

from datamesh.core.config import DataMeshConfig
from datamesh.observability import logs, metrics, tracing

__all__ = ["configure"]


def configure(config: DataMeshConfig, *, install_logging: bool = True) -> logging.Handler | None:
    """Set up metrics, tracing and (unless told not to) the JSON log handler for this process.

    Safe to call again (e.g. after a fork, or with a new configuration): it replaces what it set up.
    Returns the log handler it installed.
    """
    metrics.set_enabled(config.metrics)
    tracing.setup(
        service_name=config.service_name,
        sample_rate=config.trace_sample_rate,
        otlp_endpoint=config.otlp_endpoint,
        trace_file=config.trace_file,
    )
    if not install_logging:
        return None
    return logs.install(level=config.log_level, fmt=config.log_format, sample_rate=config.trace_sample_rate)
