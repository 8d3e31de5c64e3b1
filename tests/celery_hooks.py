"""Fault injection inside Celery workers, for tests only (``worker --include tests.celery_hooks``).

Reads ``DATAMESH_TEST_HOOKS_REDIS`` (a Redis URL; nothing in datamesh reads it).  Before and after each
step the hook looks at two keys: ``dm:test:fault`` = ``step:phase[,step:phase]`` raises there; ``dm:test:delay`` =
seconds, sleeps a random time up to it (so a kill lands mid-step).
"""

from __future__ import annotations

import os
import random
import time

import redis

from datamesh.pipeline.saga import InjectedFault
from datamesh.workers.runtime import RUNTIME

_URL = os.environ.get("DATAMESH_TEST_HOOKS_REDIS")
_client = redis.Redis.from_url(_URL) if _URL else None


def hook(step: str, phase: str) -> None:
    if _client is None:
        return
    try:
        fault, delay = _client.mget("dm:test:fault", "dm:test:delay")
    except redis.RedisError:
        return  # the hooks' Redis is down (the broker restart test): the step runs as it would unhooked
    if delay:
        time.sleep(random.uniform(0, float(delay)))
    if fault and f"{step}:{phase}" in fault.decode().split(","):
        raise InjectedFault(f"injected at {phase} {step}")


RUNTIME.faults = hook
