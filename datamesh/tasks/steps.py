"""The saga's step tasks: ``store_blobs`` (per region), ``write_ap`` (per shard), ``commit_cp`` (the pivot).

Each task: counts the delivery in ``saga_steps.attempts`` (the redelivery cap) and skips a saga that is
no longer running; runs the shared step function; turns a retryable ``Err`` into a retry with
full-jitter backoff and anything else into a failure, which fires the chain's errback
(:func:`datamesh.tasks.compensation.step_failed`).
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import redis
from celery import Task, shared_task

from datamesh.core.errors import DataMeshError, StorageError, describe
from datamesh.core.result import Err, Ok, Result
from datamesh.core.retry import full_jitter_delay
from datamesh.core.types import GeoRegion
from datamesh.observability import logs
from datamesh.pipeline.plan import BlobPlan, SagaPlan
from datamesh.pipeline.steps import Step, _NotRunning, commit_cp, store_blobs, write_ap_part
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sagas import SagaStatus
from datamesh.storage.cp.sql import utcnow
from datamesh.tasks.codec import PartFormatError, decode_part, stash_key, unb64
from datamesh.tasks.index import enqueue_index_drains
from datamesh.workers import queues
from datamesh.workers.runtime import RUNTIME

_RETRY_BASE_S = 0.05
_RETRY_CAP_S = 2.0


def retry_delay(attempt: int) -> float:
    """Full-jitter backoff of the saga's step and compensation tasks before their ``attempt``-th try."""
    return full_jitter_delay(attempt, base_s=_RETRY_BASE_S, cap_s=_RETRY_CAP_S)


log = logs.logger(__name__)

_MAX_BOUNCES = 1000  # re-queues of a message whose shard another worker holds, or that reached a wrong region


class StepFailed(Exception):
    """A saga step failed for good: the errback records it and enqueues the compensation."""


def begin(task: Task, saga_id: str, step: str) -> int | None:
    """Count this delivery of the saga step; ``None`` when the saga is not running or the step is
    done already (a late duplicate: the chain goes on, the step's work is not redone).

    Returns the step's delivery count from the saga log: that count, not Celery's ``retries`` (which
    also counts re-queues of a message whose shard another worker held), is the redelivery cap.
    """
    tiers = RUNTIME.tiers()
    begun = tiers.cp.run(
        lambda c: sagas.begin_step(c, saga_id, step, now=utcnow(), lease_s=tiers.lease_s), operation="task.begin"
    )
    if isinstance(begun, Err):
        # the CP tier is unreachable: nothing was counted, try again later (the reaper backs this up)
        raise task.retry(
            countdown=retry_delay(task.request.retries + 1),
            max_retries=_MAX_BOUNCES,
        )
    delivery = begun.value
    if delivery.status != SagaStatus.RUNNING or delivery.done:
        return None  # a saga that moved on, or a step that already succeeded: a late duplicate
    if delivery.attempts > RUNTIME.config.step_max_deliveries:
        raise StepFailed(f"{step} delivered {delivery.attempts} times (cap {RUNTIME.config.step_max_deliveries})")
    return delivery.attempts


def finish(task: Task, saga_id: str, step: str, result: Result[Any, Any], attempts: int) -> None:
    """Retry a retryable failure with full jitter while the step's deliveries are under the cap."""
    if isinstance(result, Ok):
        RUNTIME.faults(step, "after")
        return
    error = result.error
    retryable = isinstance(error, StorageError) and error.retryable
    if retryable and attempts < RUNTIME.config.step_max_deliveries:
        if error.tier != "cp":  # the CP tier failing, writing the lease would only wait on it again
            hand_back(saga_id)
        raise task.retry(
            countdown=retry_delay(attempts),
            max_retries=_MAX_BOUNCES,  # the cap that matters is ``attempts``, counted in the saga log
        )
    raise StepFailed(describe(error) if isinstance(error, DataMeshError) else str(error))  # type: ignore[arg-type]


def hand_back(saga_id: str) -> None:
    """The step's message goes back to its queue (a retry): the running saga waits there under the
    queue timeout, not the running lease.  Best effort: if this write fails too, the running lease
    stands and the reaper may take the saga when it expires, as it would have before."""
    tiers = RUNTIME.tiers()
    tiers.cp.run(
        lambda c: sagas.relet(c, saga_id, SagaStatus.RUNNING, now=utcnow(), lease_s=tiers.queue_lease_s),
        operation="task.hand_back",
    )


def run_step(task: Task, saga_id: str, step: str, fault_step: str, body: Callable[[], Result[Any, Any]]) -> str:
    attempts = begin(task, saga_id, step)
    if attempts is None:
        return "skipped"
    with heartbeat(saga_id):
        RUNTIME.faults(fault_step, "before")
        result = body()
    finish(task, saga_id, fault_step, result, attempts)
    return "done"


@contextlib.contextmanager
def heartbeat(saga_id: str) -> Iterator[None]:
    """Renew the running saga's lease every third of it while the step runs, so a live step that
    takes longer than the lease (up to the task's time limit) is not taken for a dead one.  The
    beats stop with the process: a killed worker's saga is reaped one lease after its last beat.
    Best effort: a beat that fails leaves the lease as it was."""
    tiers = RUNTIME.tiers()
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(tiers.lease_s / 3):
            tiers.cp.run(
                lambda c: sagas.renew_lease(c, saga_id, now=utcnow(), lease_s=tiers.lease_s),
                operation="task.heartbeat",
            )

    beating = threading.Thread(target=beat, name=f"datamesh-heartbeat-{saga_id}", daemon=True)
    beating.start()
    try:
        yield
    finally:
        stop.set()
        beating.join()


def hold_shard(task: Task, region: str, shard: int) -> None:
    """Residency and single writer: this worker serves the region and holds the shard's lease."""
    if not RUNTIME.serves(region):
        raise task.retry(countdown=1.0, max_retries=_MAX_BOUNCES, queue=queues.ap_queue(region, shard))
    try:
        token, wait_s = RUNTIME.leases().acquire(region, shard)
    except redis.RedisError:
        # A broker blip, not the step failing: put the message back with full jitter (bounded like
        # the other bounces) before ``begin``, so no delivery is counted and the saga is not
        # compensated for it.  A lease we held stays trusted only until its local deadline.
        raise task.retry(
            countdown=retry_delay(task.request.retries + 1),
            max_retries=_MAX_BOUNCES,
        ) from None
    if token is None:
        # Another live worker owns the shard: release our own hold on its file (the shard's writer
        # lock) and put the message back; the owner (or whoever takes the shard when the lease
        # expires) will run it.  Bounded, so a message nobody can take fails (and its saga is
        # compensated) instead of circulating for ever.
        RUNTIME.tiers().ap.close_shard(GeoRegion(region), shard)
        raise task.retry(countdown=min(wait_s, 5.0), max_retries=_MAX_BOUNCES)
    opened = RUNTIME.tiers().ap.open_shard(GeoRegion(region), shard)
    if isinstance(opened, Err):
        # We hold the lease but a previous owner on this host still has the file open (it has not
        # noticed it lost the lease): wait for it to let go, without counting a delivery.
        RUNTIME.leases().forget(region, shard)
        raise task.retry(countdown=0.5, max_retries=_MAX_BOUNCES)


def _index_delay_s() -> float | None:
    """How long after a commit its index drain runs: at once for SQLite shards, whose writes every
    reader sees; after the owner's flush interval for LSM shards, so the index worker (a reader of
    shards other processes own) finds the committed content flushed instead of failing the rows."""
    if RUNTIME.config.ap_engine != "lsm":
        return None
    from datamesh.storage.ap.lsm import DEFAULT_FLUSH_INTERVAL_S

    return DEFAULT_FLUSH_INTERVAL_S


def unstash(saga_id: str, part: str) -> Result[bytes, StorageError]:
    """The payload stashed for ``part`` of the saga (see :mod:`datamesh.tasks.codec`)."""
    try:
        raw = RUNTIME.redis().hget(stash_key(saga_id), part)
    except redis.RedisError as exc:
        return Err(StorageError("broker", "unstash", f"saga {saga_id} {part}: {exc}", retryable=True, cause=repr(exc)))
    if raw is None:
        return Err(
            StorageError(
                "broker",
                "unstash",
                f"saga {saga_id} {part}: its content is no longer in the broker (expired, or lost with the"
                " broker's data); the saga is compensated and the request may be sent again",
            )
        )
    return Ok(raw if isinstance(raw, bytes) else raw.encode())  # bytes: the client decodes nothing


@shared_task(bind=True, name=queues.STORE_BLOBS)
def store_blobs_task(self: Task, *, saga_id: str, tenant: str, region: str, part: str) -> str:
    if not RUNTIME.serves(region):  # a misrouted message goes back to its region's queue
        raise self.retry(countdown=1.0, max_retries=_MAX_BOUNCES, queue=queues.blobs_queue(region))

    def body() -> Result[Any, Any]:
        stashed = unstash(saga_id, part)
        if isinstance(stashed, Err):
            return stashed
        blobs = json.loads(stashed.value)
        plan = SagaPlan(saga_id, tenant, [], [BlobPlan(region, h, int(size)) for h, size, _ in blobs])
        return store_blobs(RUNTIME.tiers(), plan, {(region, h): unb64(b) for h, _, b in blobs}, part=part)

    return run_step(self, saga_id, part, Step.STORE_BLOBS, body)


@shared_task(bind=True, name=queues.WRITE_AP)
def write_ap_task(self: Task, *, saga_id: str, region: str, shard: int, part: str, marks: list[str]) -> str:
    hold_shard(self, region, shard)

    def body() -> Result[Any, Any]:
        stashed = unstash(saga_id, part)
        if isinstance(stashed, Err):
            return stashed
        try:
            sub, decoded = decode_part(stashed.value)
        except PartFormatError as exc:  # nothing written: the saga fails and is compensated
            return Err(StorageError("broker", "unstash", f"saga {saga_id} {part}: {exc}"))
        return write_ap_part(RUNTIME.tiers(), sub, decoded, part=part, marks=[Step(m) for m in marks])

    return run_step(self, saga_id, part, Step.WRITE_AP, body)


@shared_task(bind=True, name=queues.COMMIT_CP)
def commit_cp_task(self: Task, *, saga_id: str) -> str:
    tiers = RUNTIME.tiers()
    regions: set[str] = set()

    def pivot() -> Result[Any, Any]:
        record = tiers.cp.run(lambda c: sagas.load(c, saga_id), operation="task.commit_cp.load", write=False)
        if isinstance(record, Err):
            return record
        if record.value is None:
            return Err(StorageError("cp", "commit_cp", f"saga {saga_id} is not in the saga log"))
        plan = SagaPlan.from_json(record.value.plan_json)
        regions.update(item.region for item in plan.items)
        committed = commit_cp(tiers, plan)
        if isinstance(committed, Err) and isinstance(committed.error, _NotRunning):
            return Ok([])  # committed by a reaper, or compensating: either way not ours to change
        return committed

    outcome = run_step(self, saga_id, Step.COMMIT_CP, Step.COMMIT_CP, pivot)
    status = tiers.cp.run(lambda c: sagas.status_of(c, saga_id), operation="task.commit_cp.status", write=False)
    if isinstance(status, Ok) and status.value is not None:
        RUNTIME.notify(saga_id, status.value.value)
        if status.value == SagaStatus.COMMITTED and regions:
            # The commit wrote index outbox rows: have them indexed now (beat's drains are the backstop).
            try:
                enqueue_index_drains(self.app, regions, countdown=_index_delay_s())
            except Exception as exc:  # noqa: BLE001 - the saga is committed; a drain comes with the next beat
                log.warning("saga %s: index drain not enqueued: %s", saga_id, exc)
    return outcome
