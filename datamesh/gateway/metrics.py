"""The gateway's Prometheus metrics: a minimal set, on a registry of its own (one per app)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "datamesh_http_requests_total",
            "HTTP requests answered, by method, route template and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "datamesh_http_request_duration_seconds",
            "time from request to the last byte of the response",
            ["method", "route"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=self.registry,
        )
        self.in_flight = Gauge("datamesh_http_in_flight", "HTTP requests being handled", registry=self.registry)
        self.ingested = Counter(
            "datamesh_ingest_items_total",
            "turns submitted through the gateway, by outcome (accepted, deduplicated, rejected)",
            ["outcome"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "datamesh_rate_limited_total",
            "requests refused by the rate limiter, by bucket (key, tenant, limiter=Redis unavailable)",
            ["scope"],
            registry=self.registry,
        )
        self.auth_failures = Counter(
            "datamesh_auth_failures_total", "requests refused with 401 or 403", ["status"], registry=self.registry
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
