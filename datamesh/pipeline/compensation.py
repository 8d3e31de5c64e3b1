"""Compensations: undo a saga's pre-pivot steps in reverse order, idempotently.

Compensation first *claims* the saga (``running`` → ``compensating``).  A saga that already
committed is left alone; one already compensating or compensated is compensated again, which is
harmless (every undo is idempotent) and cleans up after a slow driver that wrote after the claim.
Each undo is safe when its step never ran.
"""

from __future__ import annotations

from collections import defaultdict

from sqlalchemy.engine import Connection

from datamesh.core.errors import StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.retry import RetryPolicy, full_jitter_delay
from datamesh.core.types import GeoRegion
from datamesh.observability import ledger, logs
from datamesh.observability.instrument import saga_step
from datamesh.pipeline.plan import SagaPlan
from datamesh.pipeline.steps import Step, _key
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import idempotency, object_refs, sagas
from datamesh.storage.cp.sagas import SagaStatus, StepState
from datamesh.storage.cp.sql import utcnow

DEFAULT_COMPENSATION_POLICY = RetryPolicy(attempts=6, base_s=0.05, cap_s=2.0)

log = logs.logger(__name__)


def claim(tiers: Tiers, saga_id: str, *, failed_step: str, error: str) -> Result[SagaStatus | None, StorageError]:
    """Move a running saga to compensating; returns the status it has afterwards."""

    def tx(conn: Connection) -> SagaStatus | None:
        sagas.transition(
            conn,
            saga_id,
            from_status=(SagaStatus.RUNNING,),
            to_status=SagaStatus.COMPENSATING,
            now=utcnow(),
            lease_s=tiers.lease_s,
            failed_step=failed_step,
            error=error,
        )
        return sagas.status_of(conn, saga_id)

    return tiers.cp.run(tx, operation="saga.claim_compensation")


def compensate(tiers: Tiers, saga_id: str, *, failed_step: str, error: str) -> Result[SagaStatus, StorageError]:
    """Undo everything before the pivot; ``Ok(COMMITTED)`` means the saga had committed and stays."""
    claimed = claim(tiers, saga_id, failed_step=failed_step, error=error)
    if isinstance(claimed, Err):
        return claimed
    status = claimed.value
    if status is None:
        return Ok(SagaStatus.COMPENSATED)  # the saga was never created: nothing to undo
    if status == SagaStatus.COMMITTED:
        return Ok(status)
    record = tiers.cp.run(lambda conn: sagas.load(conn, saga_id), operation="saga.load", write=False)
    if isinstance(record, Err):
        return record
    assert record.value is not None
    plan = SagaPlan.from_json(record.value.plan_json)
    for undo in (undo_write_ap, undo_store_blobs, undo_reserve):
        done = undo(tiers, plan)
        if isinstance(done, Err):
            return done
    return Ok(SagaStatus.COMPENSATED)


def compensate_with_retries(
    tiers: Tiers, saga_id: str, *, failed_step: str, error: str, policy: RetryPolicy = DEFAULT_COMPENSATION_POLICY
) -> Result[SagaStatus, StorageError]:
    """Compensate, retrying with full-jitter backoff; after ``policy.attempts`` the saga is dead."""
    import time

    last: Result[SagaStatus, StorageError] = Ok(SagaStatus.COMPENSATED)
    for attempt in range(1, policy.attempts + 1):
        last = compensate(tiers, saga_id, failed_step=failed_step, error=error)
        if isinstance(last, Ok):
            return last
        _count_attempt(tiers, saga_id)
        if attempt < policy.attempts:
            time.sleep(full_jitter_delay(attempt, base_s=policy.base_s, cap_s=policy.cap_s))
    dead = tiers.cp.run(
        lambda conn: sagas.transition(
            conn,
            saga_id,
            from_status=(SagaStatus.RUNNING, SagaStatus.COMPENSATING),
            to_status=SagaStatus.DEAD,
            now=utcnow(),
            error=f"compensation kept failing: {last.error if isinstance(last, Err) else ''}",
        ),
        operation="saga.dead_letter",
    )
    if isinstance(dead, Ok) and dead.value:
        _count_dead(tiers, saga_id)
        log.error("saga %s dead-lettered: compensation kept failing", saga_id, extra={"saga_id": saga_id})
        return Ok(SagaStatus.DEAD)
    return last


def _count_dead(tiers: Tiers, saga_id: str) -> None:
    record = tiers.cp.run(lambda conn: sagas.load(conn, saga_id), operation="saga.load", write=False)
    if isinstance(record, Ok) and record.value is not None:
        ledger.dead_lettered(item.region for item in SagaPlan.from_json(record.value.plan_json).items)


@saga_step("write_ap", compensation=True)
def undo_write_ap(tiers: Tiers, plan: SagaPlan) -> Result[None, StorageError]:
    """Delete the saga's AP keys (turn ids are the saga's own, so no other content is touched)."""
    keys: dict[str, list[bytes]] = defaultdict(list)
    for item in plan.items:
        keys[item.region].append(_key(item))
    for region, region_keys in keys.items():
        deleted = tiers.ap.delete_many(GeoRegion(region), region_keys)
        if isinstance(deleted, Err):
            return deleted
    return _mark(tiers, plan.saga_id, Step.WRITE_AP)


@saga_step("store_blobs", compensation=True)
def undo_store_blobs(tiers: Tiers, plan: SagaPlan, *, region: str | None = None) -> Result[None, StorageError]:
    """Drop the saga's references to its blobs; the blobs themselves stay.

    A blob left with no reference is deleted by garbage collection once it is older than the grace
    period (``python -m datamesh objects gc``), never here: another saga may be about to store the
    same content.  With ``region``, only that region's references (the distributed executor undoes
    each region on that region's workers).
    """

    def tx(conn: Connection) -> None:
        object_refs.drop_refs(conn, plan.saga_id, region=region)
        planned = [(b.region, b.content_hash) for b in plan.blobs if region is None or b.region == region]
        object_refs.forget_unreferenced(conn, planned)
        sagas.record_step(
            conn, plan.saga_id, Step.STORE_BLOBS, StepState.COMPENSATED, now=utcnow(), lease_s=tiers.queue_lease_s
        )

    return tiers.cp.run(tx, operation="saga.undo_store_blobs")


@saga_step("reserve", compensation=True)
def undo_reserve(tiers: Tiers, plan: SagaPlan) -> Result[None, StorageError]:
    """Release the saga's pending idempotency keys and close the saga as compensated."""

    def tx(conn: Connection) -> SagaStatus | None:
        now = utcnow()
        idempotency.release(conn, plan.saga_id)
        sagas.record_step(conn, plan.saga_id, Step.RESERVE, StepState.COMPENSATED, now=now, lease_s=tiers.queue_lease_s)
        sagas.mark_all_compensated(conn, plan.saga_id, now=now)
        for source in (SagaStatus.COMPENSATING, SagaStatus.DEAD):
            if sagas.transition(conn, plan.saga_id, from_status=(source,), to_status=SagaStatus.COMPENSATED, now=now):
                return source
        return None  # already compensated by an earlier run: counted then

    closed = tiers.cp.run(tx, operation="saga.undo_reserve")
    if isinstance(closed, Err):
        return closed
    if closed.value is not None:
        ledger.compensated((item.region for item in plan.items), from_dead=closed.value == SagaStatus.DEAD)
    return Ok(None)


def _mark(tiers: Tiers, saga_id: str, step: Step) -> Result[None, StorageError]:
    """Record an undo done; under the Celery executor the next undo waits in a queue (the queue timeout)."""
    return tiers.cp.run(
        lambda conn: sagas.record_step(
            conn, saga_id, step, StepState.COMPENSATED, now=utcnow(), lease_s=tiers.queue_lease_s
        ),
        operation=f"saga.{step}.compensated",
    )


def _count_attempt(tiers: Tiers, saga_id: str) -> None:
    """Count a failed compensation attempt of a compensating saga, or of a dead one being re-driven
    (``sagas retry`` keeps it dead, attempts reset, until its compensation completes)."""

    def tx(conn: Connection) -> None:
        for status in (SagaStatus.COMPENSATING, SagaStatus.DEAD):
            if sagas.transition(
                conn, saga_id, from_status=(status,), to_status=status, now=utcnow(), count_attempt=True
            ):
                return

    tiers.cp.run(tx, operation="saga.count_attempt")
