"""Fault injection inside Celery workers, for tests only (``worker --include tests.celery_hooks``).

Reads ``DATAMESH_TEST_HOOKS_REDIS`` (a Redis URL; nothing in datamesh reads it).  Before and after each
step (and each undo) the hook looks at four keys: ``dm:test:fault`` = ``step:phase[,step:phase]`` raises
there; ``dm:test:delay`` = seconds, sleeps a random time up to it (so a kill lands mid-step);
``dm:test:record`` set, appends ``step:phase`` to the list ``dm:test:trace`` (the order steps ran in);
``dm:test:crash`` = ``step:phase``, the first worker process to reach that point deletes the key and
kills itself with SIGKILL (a crash: no errback, the message is not acknowledged);
``dm:test:crash_always`` = ``step:phase``, every worker process that reaches that point, on every
delivery, adds one to ``dm:test:crashes`` and kills itself with SIGKILL (a poison message, which
``task_reject_on_worker_lost`` would redeliver for ever but for DATAMESH_STEP_MAX_DELIVERIES);
``dm:test:stall`` = ``step:phase=seconds``, sleeps exactly that long there (a slow, live step).
"""

from __future__ import annotations

import os
import random
import signal
import time

import redis

from datamesh.pipeline.saga import InjectedFault
from datamesh.workers.runtime import RUNTIME

_URL = os.environ.get("DATAMESH_TEST_HOOKS_REDIS")
_client = redis.Redis.from_url(_URL) if _URL else None


def hook(step: str, phase: str) -> None:
    if _client is None:
        return
    point = f"{step}:{phase}"
    try:
        fault, delay, record, crash, crash_always, stall = _client.mget(
            "dm:test:fault", "dm:test:delay", "dm:test:record", "dm:test:crash", "dm:test:crash_always", "dm:test:stall"
        )
        if record:
            _client.rpush("dm:test:trace", point)
        if crash and crash.decode() == point and _client.delete("dm:test:crash"):
            os.kill(os.getpid(), signal.SIGKILL)
        if crash_always and crash_always.decode() == point:
            _client.incr("dm:test:crashes")  # counted before the kill: the test knows how often the step ran
            os.kill(os.getpid(), signal.SIGKILL)
    except redis.RedisError:
        return  # the hooks' Redis is down (the broker restart test): the step runs as it would unhooked
    if delay:
        time.sleep(random.uniform(0, float(delay)))
    if stall and stall.decode().partition("=")[0] == point:
        time.sleep(float(stall.decode().partition("=")[2]))
    if fault and point in fault.decode().split(","):
        raise InjectedFault(f"injected at {phase} {step}")


RUNTIME.faults = hook
