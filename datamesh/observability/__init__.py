"""Observability: trace context (W3C ``traceparent``), request ids, log correlation."""
