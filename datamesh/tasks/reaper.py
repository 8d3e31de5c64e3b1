"""The reaper as a Celery beat task: sagas whose lease expired are driven forward or compensated.

It reuses :func:`datamesh.pipeline.saga.reap` (safe to run in several places at once: the pivot only
commits a running saga, the compensation claim only takes a running one), with compensation enqueued
as tasks rather than run here, since only a shard's owner may delete its content.
"""

from __future__ import annotations

from celery import Celery, current_app, shared_task

from datamesh.pipeline.saga import ReapOutcome, reap
from datamesh.pipeline.tiers import Tiers
from datamesh.tasks.compensation import enqueue_compensation
from datamesh.workers import queues
from datamesh.workers.runtime import RUNTIME


def reap_distributed(app: Celery, tiers: Tiers, *, limit: int = 100) -> list[ReapOutcome]:
    """One reaper pass for the Celery executor (also what ``python -m datamesh reap`` runs then)."""
    return reap(
        tiers,
        limit=limit,
        compensate=lambda t, saga_id, step, error: enqueue_compensation(app, t, saga_id, failed_step=step, error=error),
    )


@shared_task(name=queues.REAP)
def reap_task() -> list[list[str]]:
    outcomes = reap_distributed(current_app, RUNTIME.tiers())
    for outcome in outcomes:
        if outcome.action in ("committed", "compensated", "dead"):
            RUNTIME.notify(outcome.saga_id, outcome.action)
    return [[o.saga_id, o.action] for o in outcomes]
