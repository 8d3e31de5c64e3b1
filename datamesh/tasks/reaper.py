"""The reaper as a Celery beat task: sagas whose lease expired are driven forward or compensated.

It reuses :func:`datamesh.pipeline.saga.reap` (safe to run in several places at once: the pivot only
commits a running saga, the compensation claim only takes a running one), with compensation enqueued
as tasks rather than run here, since only a shard's owner may delete its content.
"""

from __future__ import annotations

import contextlib
from collections import Counter

import redis
from celery import Celery, current_app, shared_task

from datamesh.core.config import DEFAULT_REAPER_PIVOT_ATTEMPTS
from datamesh.observability import metrics
from datamesh.pipeline.saga import Compensator, ReapOutcome, reap, redrive_pivot
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp.sagas import FINAL_STATUSES
from datamesh.tasks.compensation import redrive_compensation
from datamesh.workers import queues
from datamesh.workers.runtime import RUNTIME, announce


def reap_distributed(
    app: Celery,
    tiers: Tiers,
    broker: redis.Redis,
    *,
    limit: int = 100,
    pivot_attempts: int = DEFAULT_REAPER_PIVOT_ATTEMPTS,
) -> list[ReapOutcome]:
    """One reaper pass for the Celery executor: beat's task, the pipeline's own reaper and
    ``python -m datamesh reap`` all run this.

    A saga the pass settles (it commits one here, or finds one committed) is announced on ``broker``
    as the ``commit_cp`` task would have: its waiter wakes and its stash is deleted, rather than left
    to its TTL (that task's message is lost or late, or the reaper would not have had the saga).  A
    compensation is enqueued here and announced by its last undo, as on the normal path.
    """
    outcomes = reap(tiers, limit=limit, compensate=_compensator(app), pivot_attempts=pivot_attempts)
    for outcome in outcomes:
        _announce_settled(broker, outcome)
    return outcomes


def redrive_pivot_distributed(
    app: Celery, tiers: Tiers, broker: redis.Redis, saga_id: str, *, pivot_attempts: int
) -> ReapOutcome | None:
    """``sagas retry`` of a saga dead-lettered at its pivot, for the Celery executor
    (:func:`datamesh.pipeline.saga.redrive_pivot`, announced as :func:`reap_distributed` does)."""
    outcome = redrive_pivot(tiers, saga_id, compensate=_compensator(app), pivot_attempts=pivot_attempts)
    if outcome is not None:
        _announce_settled(broker, outcome)
    return outcome


def _compensator(app: Celery) -> Compensator:
    return lambda t, saga_id, step, error: redrive_compensation(app, t, saga_id, failed_step=step, error=error)


def _announce_settled(broker: redis.Redis, outcome: ReapOutcome) -> None:
    if outcome.action in FINAL_STATUSES:
        announce(broker, outcome.saga_id, outcome.action)  # best effort: a Redis error is swallowed


def observe_queue_depths(client: redis.Redis, shard_count: int) -> dict[tuple[str, str], int]:
    """Set ``datamesh_queue_depth{region,step}`` from the Redis broker: one pipelined ``LLEN`` per queue.

    Messages waiting only (kombu keeps a Redis list per queue); reserved, unacknowledged ones are not
    counted.  ``step`` is the queue's kind (``cp``, ``blobs``, ``ap``), AP shards summed per region.
    """
    names = queues.all_queues(shard_count)
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.llen(name)
    totals: Counter[tuple[str, str]] = Counter()
    for name, depth in zip(names, pipe.execute(), strict=True):
        totals[queues.depth_labels(name)] += int(depth)
    if metrics.enabled():
        for (region, kind), depth in totals.items():
            metrics.QUEUE_DEPTH.labels(region, kind).set(depth)
    return dict(totals)


@shared_task(name=queues.REAP)
def reap_task() -> list[list[str]]:
    if RUNTIME.config.broker_url.startswith(("redis://", "rediss://", "unix://")):
        with contextlib.suppress(redis.RedisError):  # a gauge, never a reason to skip the reaper
            observe_queue_depths(RUNTIME.redis(), RUNTIME.config.ap_shards)
    config = RUNTIME.config
    outcomes = reap_distributed(
        current_app, RUNTIME.tiers(), RUNTIME.redis(), pivot_attempts=config.reaper_pivot_attempts
    )
    return [[o.saga_id, o.action] for o in outcomes]
