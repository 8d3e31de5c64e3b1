"""The errback and the compensation tasks.

``step_failed`` is the chain's ``link_error``.  Celery calls it inline, in the worker whose step
failed, and only for that step; it records the failure in the saga log (``running`` →
``compensating``) and enqueues ``compensate``.  It compensates nothing itself.

``compensate`` reads the plan from the saga log and enqueues the undo chain, in reverse order of the
steps: ``undo_write_ap`` on each shard's queue (only the shard's owner deletes its content),
``undo_store_blobs`` on each region's blob queue, ``undo_reserve`` on ``cp``.  Each undo is idempotent
and safe when its step never ran; a failing undo retries with full-jitter backoff, counting the saga's
``attempts``, and after DATAMESH_COMPENSATION_ATTEMPTS the saga is dead-lettered (``sagas --dead``
lists it, ``sagas retry ID`` enqueues ``compensate`` again).
"""

from __future__ import annotations

from typing import Any

from celery import Celery, Task, current_app, shared_task

from datamesh.core.errors import StorageError, describe
from datamesh.core.result import Err, Ok, Result
from datamesh.observability import logs
from datamesh.pipeline import compensation
from datamesh.pipeline.plan import SagaPlan
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sagas import SagaStatus
from datamesh.storage.cp.sql import utcnow
from datamesh.tasks.codec import compensation_chain
from datamesh.tasks.steps import hold_shard, retry_delay
from datamesh.workers import queues
from datamesh.workers.runtime import RUNTIME

log = logs.logger(__name__)


@shared_task(name=queues.STEP_FAILED)
def step_failed(request: Any, exc: BaseException, traceback: Any) -> None:
    """``link_error`` of every step: record the failure, enqueue the compensation, nothing more."""
    saga_id = (request.kwargs or {}).get("saga_id")
    if not saga_id:
        return
    step = str(request.task).removeprefix("datamesh.")
    enqueue_compensation(current_app, RUNTIME.tiers(), saga_id, failed_step=step, error=f"{type(exc).__name__}: {exc}")


def enqueue_compensation(
    app: Celery, tiers: Tiers, saga_id: str, *, failed_step: str, error: str
) -> Result[SagaStatus, StorageError]:
    """Claim a running saga for compensation and enqueue ``compensate``; a committed saga stays.

    The claim gives the saga the short running lease; only once ``compensate`` is published does it
    get the queue timeout (the message waits in a queue).  So if this fails (CP or broker down) the
    saga keeps the short lease and the reaper tries again soon, rather than after the queue timeout.
    If the lease cannot be extended after publishing, the reaper may enqueue ``compensate`` a second
    time: harmless, compensation is idempotent.
    """
    claimed = compensation.claim(tiers, saga_id, failed_step=failed_step, error=error)
    if isinstance(claimed, Err):
        return claimed
    status = claimed.value
    if status is None:
        return Ok(SagaStatus.COMPENSATED)
    if status not in (SagaStatus.COMPENSATING,):
        return Ok(status)
    try:
        app.signature(queues.COMPENSATE, kwargs={"saga_id": saga_id}).apply_async()
    except Exception as exc:  # noqa: BLE001 - the broker's failures: the reaper will enqueue again
        return Err(StorageError("broker", "enqueue_compensation", str(exc), retryable=True, cause=repr(exc)))
    extended = queue_lease(tiers, saga_id, SagaStatus.COMPENSATING)
    if isinstance(extended, Err):
        log.warning("saga %s: compensation enqueued, lease not extended: %s", saga_id, extended.error)
    return Ok(SagaStatus.COMPENSATING)


def redrive_compensation(
    app: Celery, tiers: Tiers, saga_id: str, *, failed_step: str, error: str
) -> Result[SagaStatus, StorageError]:
    """The reaper's compensator: a running saga is claimed and compensated (:func:`enqueue_compensation`);
    a compensating one (its compensation never reported back) is enqueued again, and dead-lettered
    once it was re-driven more than DATAMESH_COMPENSATION_ATTEMPTS times with none of its undos
    starting (an undo that starts counts its own attempts)."""
    counted = tiers.cp.run(lambda c: sagas.count_redrive(c, saga_id, now=utcnow()), operation="saga.count_redrive")
    if isinstance(counted, Err):
        return counted
    if counted.value is not None and counted.value[0] == SagaStatus.COMPENSATING:
        limit = RUNTIME.config.compensation_attempts
        if counted.value[1] > limit:
            return _dead_letter_saga(tiers, saga_id, f"compensation enqueued {limit + 1} times and never started")
    return enqueue_compensation(app, tiers, saga_id, failed_step=failed_step, error=error)


def queue_lease(tiers: Tiers, saga_id: str, status: SagaStatus) -> Result[bool, StorageError]:
    """The saga (if still ``status``) is handed to a queue: its lease becomes the queue timeout, so the
    reaper leaves it alone while its next message waits (``False``: the saga had moved on)."""
    return tiers.cp.run(
        lambda c: sagas.relet(c, saga_id, status, now=utcnow(), lease_s=tiers.queue_lease_s),
        operation="saga.queue_lease",
    )


@shared_task(bind=True, name=queues.COMPENSATE)
def compensate_task(self: Task, *, saga_id: str) -> str:
    """Enqueue the undo chain of a compensating (or dead, when re-driven) saga."""
    tiers = RUNTIME.tiers()
    record = tiers.cp.run(lambda c: sagas.load(c, saga_id), operation="task.compensate.load", write=False)
    if isinstance(record, Err):
        raise self.retry(countdown=retry_delay(self.request.retries + 1), max_retries=None)
    if record.value is None or record.value.status not in (SagaStatus.COMPENSATING, SagaStatus.DEAD):
        return "skipped"
    queue_lease(tiers, saga_id, SagaStatus.COMPENSATING)  # failing, the lease it has stands: the reaper backs it up
    compensation_chain(self.app, SagaPlan.from_json(record.value.plan_json)).apply_async()
    return "enqueued"


def _undo(task: Task, saga_id: str, undo: Any) -> str:
    """Run one undo of the saga's compensation chain, counting it against the saga's attempts.

    The attempt is counted before the undo runs and given back when it succeeds, so an undo that
    never reports back counts too: a worker killed on every delivery (``task_reject_on_worker_lost``
    redelivers the message each time) or the task time limit.  Past DATAMESH_COMPENSATION_ATTEMPTS
    the saga is dead-lettered and the chain stops; ``sagas retry ID`` re-drives it.
    """
    tiers = RUNTIME.tiers()
    loaded = tiers.cp.run(lambda c: sagas.load(c, saga_id), operation="task.undo.load", write=False)
    if isinstance(loaded, Ok):
        if loaded.value is None:
            return "skipped"
        if loaded.value.status in (SagaStatus.COMMITTED, SagaStatus.COMPENSATED):
            task.request.chain = None  # nothing left to undo: stop the chain here
            return "skipped"
    started = tiers.cp.run(lambda c: sagas.start_undo(c, saga_id, now=utcnow()), operation="task.undo.start")
    if isinstance(loaded, Err) or loaded.value is None or isinstance(started, Err) or started.value is None:
        # the CP tier is unreachable: nothing was counted, try again later (the reaper backs this up)
        raise task.retry(countdown=retry_delay(task.request.retries + 1), max_retries=None)
    record = loaded.value
    name = str(task.name).removeprefix("datamesh.")
    count = started.value[1]
    limit = RUNTIME.config.compensation_attempts
    if count > limit:
        # The earlier deliveries of this undo never reported back: its worker died, or it ran out of time.
        lost = f"{name} did not finish in {limit} attempts (its worker was lost or it timed out)"
        return _dead_letter(task, tiers, saga_id, lost)
    done: Result[None, StorageError]
    try:
        RUNTIME.faults(name, "before")
        done = undo(tiers, SagaPlan.from_json(record.plan_json))
        if isinstance(done, Ok):
            RUNTIME.faults(name, "after")  # undone but not acknowledged: a fault here runs the undo again
    except Exception as exc:  # noqa: BLE001 - a failing undo is retried and counted, whatever the cause
        done = Err(StorageError("saga", str(task.name), f"{type(exc).__name__}: {exc}", retryable=True))
    if isinstance(done, Ok):
        # best effort: failing, the attempt stays counted (one fewer left), which is the safe side
        tiers.cp.run(lambda c: sagas.undo_succeeded(c, saga_id, now=utcnow()), operation="task.undo.succeeded")
        return "done"
    if count >= limit:
        return _dead_letter(task, tiers, saga_id, f"compensation kept failing: {describe(done.error)}")
    raise task.retry(countdown=retry_delay(count + 1), max_retries=None)


def _dead_letter(task: Task, tiers: Tiers, saga_id: str, error: str) -> str:
    """Move the saga to ``dead`` and stop its compensation chain."""
    _dead_letter_saga(tiers, saga_id, error)
    RUNTIME.notify(saga_id, SagaStatus.DEAD.value)
    task.request.chain = None
    return "dead"


def _dead_letter_saga(tiers: Tiers, saga_id: str, error: str) -> Result[SagaStatus, StorageError]:
    """Move a running or compensating saga to ``dead``; counted in the ledger once, by the process
    whose transition moved it."""
    dead = tiers.cp.run(
        lambda c: sagas.transition(
            c,
            saga_id,
            from_status=(SagaStatus.RUNNING, SagaStatus.COMPENSATING),
            to_status=SagaStatus.DEAD,
            now=utcnow(),
            error=error,
        ),
        operation="saga.dead_letter",
    )
    if isinstance(dead, Err):
        return dead
    if dead.value:
        compensation._count_dead(tiers, saga_id)
    return Ok(SagaStatus.DEAD)


@shared_task(bind=True, name=queues.UNDO_WRITE_AP)
def undo_write_ap_task(self: Task, *, saga_id: str, region: str, shard: int) -> str:
    hold_shard(self, region, shard)

    def undo(tiers: Tiers, plan: SagaPlan) -> Result[None, StorageError]:
        plan.items = [i for i in plan.items if i.region == region and i.shard == shard]
        return compensation.undo_write_ap(tiers, plan)

    return _undo(self, saga_id, undo)


@shared_task(bind=True, name=queues.UNDO_STORE_BLOBS)
def undo_store_blobs_task(self: Task, *, saga_id: str, region: str) -> str:
    if not RUNTIME.serves(region):  # a misrouted message goes back to its region's queue
        raise self.retry(countdown=1.0, max_retries=1000, queue=queues.blobs_queue(region))
    return _undo(self, saga_id, lambda tiers, plan: compensation.undo_store_blobs(tiers, plan, region=region))


@shared_task(bind=True, name=queues.UNDO_RESERVE)
def undo_reserve_task(self: Task, *, saga_id: str) -> str:
    outcome = _undo(self, saga_id, compensation.undo_reserve)
    tiers = RUNTIME.tiers()
    status = tiers.cp.run(lambda c: sagas.status_of(c, saga_id), operation="task.undo_reserve.status", write=False)
    if isinstance(status, Ok) and status.value is not None:
        RUNTIME.notify(saga_id, status.value.value)
    return outcome
