"""Celery wiring: the app, queues and routing, leases, the executor and worker entry points."""
