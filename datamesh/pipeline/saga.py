"""The in-process saga executor and the reaper.

:class:`LocalSagaExecutor` runs a saga's steps in order in the calling thread; on any failure —
an ``Err``, an exception, or a fault injected by a test — it compensates the steps before the
pivot in reverse order and reports ``SagaFailed``.  The Celery executor runs the same step
functions as tasks.

:func:`reap` finds sagas whose lease expired (their driver died) and drives each forward, when
every pre-pivot step is recorded done, or into compensation; a pivot that fails transiently is left
for the next pass, never compensated, and after ``pivot_attempts`` such passes the saga is
dead-lettered (:func:`redrive_pivot` re-runs it).  It is safe to run anywhere, any number of times
at once: the pivot only commits a running saga and compensation is idempotent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sqlalchemy.engine import Connection

from datamesh.core.config import DEFAULT_REAPER_PIVOT_ATTEMPTS
from datamesh.core.errors import DataMeshError, SagaFailed, StorageError, describe
from datamesh.core.result import Err, Ok, Result
from datamesh.observability import ledger, logs, metrics, tracing
from datamesh.pipeline import compensation
from datamesh.pipeline.plan import SagaPlan
from datamesh.pipeline.prepare import Prepared
from datamesh.pipeline.steps import (
    Committed,
    ReserveOutcome,
    Step,
    _NotRunning,
    commit_cp,
    reserve,
    store_blobs,
    write_ap,
)
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import conversations, sagas
from datamesh.storage.cp.database import CpDatabase, is_commit_in_doubt
from datamesh.storage.cp.sagas import SagaStatus, StepState
from datamesh.storage.cp.sql import utcnow

#: Called as ``hook(step, phase)`` with phase ``"before"`` or ``"after"``; raising fails the step.
FaultHook = Callable[[str, str], None]
log = logs.logger(__name__)
Content = Mapping[int, tuple[bytes, bytes, tuple[float, ...] | None]]


class InjectedFault(Exception):
    """Raised by test fault hooks; handled like any step failure."""


def _no_faults(step: str, phase: str) -> None:
    return None


@dataclass(slots=True)
class LocalSagaExecutor:
    """Runs sagas in the calling thread (the default, embedded executor)."""

    tiers: Tiers
    shard_count: int
    faults: FaultHook = _no_faults

    def reserve(self, tenant: str, prepared: Sequence[Prepared]) -> Result[ReserveOutcome, StorageError | SagaFailed]:
        try:
            self.faults(Step.RESERVE, "before")
        except Exception as exc:  # noqa: BLE001 - nothing written yet
            return Err(SagaFailed("-", Step.RESERVE, f"{type(exc).__name__}: {exc}"))
        outcome = reserve(self.tiers, tenant, prepared, shard_count=self.shard_count)
        if isinstance(outcome, Err):
            return outcome
        try:
            self.faults(Step.RESERVE, "after")
        except Exception as exc:  # noqa: BLE001
            return Err(self._fail_or_committed(outcome.value.plan, Step.RESERVE, f"{type(exc).__name__}: {exc}"))
        return outcome

    def execute(
        self, plan: SagaPlan, content: Content, blobs: Mapping[tuple[str, str], bytes]
    ) -> Result[list[Committed], SagaFailed | StorageError]:
        """Run the steps after ``reserve``; compensate and return ``SagaFailed`` on any failure.

        A pivot whose commit a synchronous standby did not confirm in time is in doubt: when the
        saga turns out committed on the primary it is not compensated (that would be a lie about
        data that may survive) and the in-doubt ``StorageError`` is returned; a retry with the same
        idempotency key gets the first result once replication is back.
        """
        steps: list[tuple[Step, Callable[[], Result[object, object]]]] = [
            (Step.STORE_BLOBS, lambda: store_blobs(self.tiers, plan, blobs)),
            (Step.WRITE_AP, lambda: write_ap(self.tiers, plan, content)),
            (Step.COMMIT_CP, lambda: commit_cp(self.tiers, plan)),
        ]
        committed: list[Committed] = []
        for step, run in steps:
            try:
                self.faults(step, "before")
                result = run()
            except Exception as exc:  # noqa: BLE001 - a failing step is compensated, whatever the cause
                result = Err(f"{type(exc).__name__}: {exc}")
            if isinstance(result, Err):
                error = result.error
                if isinstance(error, _NotRunning) and error.status == SagaStatus.COMMITTED:
                    return Ok(_committed_by_other(self.tiers, plan))  # a reaper drove it forward
                failed = self._fail(plan, step, _message(error))
                if failed is not None:
                    return Err(failed)
                if isinstance(error, StorageError) and is_commit_in_doubt(error):
                    return Err(error)
                return Ok(_committed_by_other(self.tiers, plan))
            if step == Step.COMMIT_CP:
                committed = result.value  # type: ignore[assignment]
                continue  # past the pivot the saga stands: nothing after it can undo it
            try:
                self.faults(step, "after")
            except Exception as exc:  # noqa: BLE001
                return Err(self._fail_or_committed(plan, step, f"{type(exc).__name__}: {exc}"))
        return Ok(committed)

    def _fail(self, plan: SagaPlan, step: str, message: str) -> SagaFailed | None:
        """Compensate; ``None`` when the saga had committed after all (nothing was undone)."""
        tracing.set_error(f"saga failed at {step}")
        log.warning(
            "saga %s failed at %s: %s; compensating", plan.saga_id, step, message, extra={"saga_id": plan.saga_id}
        )
        with tracing.span("saga.compensate", **{"datamesh.saga_id": plan.saga_id, "datamesh.step": step}):
            outcome = compensation.compensate_with_retries(self.tiers, plan.saga_id, failed_step=step, error=message)
        if isinstance(outcome, Ok) and outcome.value == SagaStatus.COMMITTED:
            return None
        dead = isinstance(outcome, Err) or outcome.value == SagaStatus.DEAD
        return SagaFailed(plan.saga_id, step, message, dead_lettered=dead)

    def _fail_or_committed(self, plan: SagaPlan, step: str, message: str) -> SagaFailed:
        failed = self._fail(plan, step, message)
        return failed if failed is not None else SagaFailed(plan.saga_id, step, f"{message} (the saga had committed)")


def _message(error: object) -> str:
    if isinstance(error, DataMeshError):
        return describe(error)  # type: ignore[arg-type]
    return str(error)


def _committed_by_other(tiers: Tiers, plan: SagaPlan) -> list[Committed]:
    rows = tiers.cp.run(lambda c: conversations.seqs_of_saga(c, plan.saga_id), operation="saga.load", write=False)
    seqs = rows.unwrap_or({})
    return [Committed(i.index, i.conversation_id, i.turn_id, seqs[i.turn_id]) for i in plan.items if i.turn_id in seqs]


@dataclass(frozen=True, slots=True)
class ReapOutcome:
    saga_id: str
    action: str  # "committed" (driven forward), "compensated", "dead", "skipped", "error: ..."


#: ``compensate(tiers, saga_id, failed_step, error)``: undo a saga (in place, or by enqueueing tasks).
Compensator = Callable[[Tiers, str, str, str], Result[SagaStatus, StorageError]]


def _compensate_here(tiers: Tiers, saga_id: str, failed_step: str, error: str) -> Result[SagaStatus, StorageError]:
    return compensation.compensate_with_retries(tiers, saga_id, failed_step=failed_step, error=error)


def reap(
    tiers: Tiers,
    *,
    limit: int = 100,
    compensate: Compensator = _compensate_here,
    pivot_attempts: int = DEFAULT_REAPER_PIVOT_ATTEMPTS,
) -> list[ReapOutcome]:
    """Finish or undo every saga whose lease expired; safe to run concurrently.  A saga whose pivot
    failed retryably on ``pivot_attempts`` passes is dead-lettered (``DATAMESH_REAPER_PIVOT_ATTEMPTS``)."""
    expired = tiers.cp.run(lambda c: sagas.expired(c, now=utcnow(), limit=limit), operation="reaper.scan", write=False)
    if isinstance(expired, Err):
        return [ReapOutcome("-", f"error: {expired.error}")]
    outcomes = [
        reap_one(tiers, saga_id, compensate=compensate, pivot_attempts=pivot_attempts) for saga_id in expired.value
    ]
    observe_saga_log(tiers.cp)
    return outcomes


def redrive_pivot(
    tiers: Tiers,
    saga_id: str,
    *,
    compensate: Compensator = _compensate_here,
    pivot_attempts: int = DEFAULT_REAPER_PIVOT_ATTEMPTS,
) -> ReapOutcome | None:
    """``sagas retry`` of a saga the reaper dead-lettered at its pivot: running again with its count
    reset, then driven as the reaper drives it (committed; left for the reaper on a retryable error;
    compensated on any other).  ``None``: not such a saga (the caller compensates it instead)."""
    revived = tiers.cp.run(lambda c: sagas.revive_at_pivot(c, saga_id, now=utcnow()), operation="saga.revive")
    if isinstance(revived, Err):
        return ReapOutcome(saga_id, f"error: {revived.error}")
    if not revived.value:
        return None
    record = tiers.cp.run(lambda c: sagas.load(c, saga_id), operation="saga.load", write=False)
    if isinstance(record, Ok) and record.value is not None:
        ledger.revived(item.region for item in SagaPlan.from_json(record.value.plan_json).items)
    return reap_one(tiers, saga_id, compensate=compensate, pivot_attempts=pivot_attempts)


def observe_saga_log(cp: CpDatabase) -> None:
    """Set the saga-log gauges (sagas by status, oldest open saga's age) from the CP tier."""
    if not metrics.enabled():
        return
    summary = cp.run(lambda c: sagas.summary(c, now=utcnow()), operation="saga.summary", write=False)
    if isinstance(summary, Err):
        return
    counts, oldest_age_s = summary.value
    for status in SagaStatus:
        metrics.SAGA_LOG.labels(status.value).set(counts.get(status.value, 0))
    metrics.SAGA_OLDEST_OPEN_AGE.set(oldest_age_s)


def reap_one(
    tiers: Tiers,
    saga_id: str,
    *,
    compensate: Compensator = _compensate_here,
    pivot_attempts: int = DEFAULT_REAPER_PIVOT_ATTEMPTS,
) -> ReapOutcome:
    with logs.bind(saga_id=saga_id), tracing.span("saga.reap", **{"datamesh.saga_id": saga_id}):
        outcome = _reap_one(tiers, saga_id, compensate, pivot_attempts)
        if outcome.action.startswith("error") or outcome.action == "dead":
            tracing.set_error(outcome.action)
            log.error("reaper: saga %s: %s", saga_id, outcome.action)
        elif outcome.action != "skipped":
            log.warning("reaper: saga %s whose lease expired was %s", saga_id, outcome.action)
        return outcome


def _reap_one(tiers: Tiers, saga_id: str, compensate: Compensator, pivot_attempts: int) -> ReapOutcome:
    record = tiers.cp.run(lambda c: sagas.load(c, saga_id), operation="reaper.load", write=False)
    if isinstance(record, Err) or record.value is None:
        return ReapOutcome(saga_id, "skipped")
    saga = record.value
    if saga.status == SagaStatus.RUNNING and all(
        saga.steps.get(step) == StepState.DONE for step in (Step.RESERVE, Step.STORE_BLOBS, Step.WRITE_AP)
    ):
        committed = commit_cp(tiers, SagaPlan.from_json(saga.plan_json))
        if isinstance(committed, Ok):
            return ReapOutcome(saga_id, "committed")
        error = committed.error
        if isinstance(error, StorageError) and error.retryable:
            # A pivot that failed this way may still commit (a serialization failure, a dropped
            # connection, a commit in doubt): leave the saga running, its lease expired, for the next
            # pass rather than throw it away.  Any reaper may take it then; the pivot commits only a
            # running saga and the claim takes only a running one, so reapers running at once still
            # agree on one outcome.  Bounded: see _pivot_failed.
            return _pivot_failed(tiers, saga_id, describe(error), pivot_attempts)
    outcome = compensate(tiers, saga_id, saga.failed_step or "lease", saga.error or "lease expired")
    if isinstance(outcome, Err):
        return ReapOutcome(saga_id, f"error: {outcome.error}")
    return ReapOutcome(saga_id, outcome.value.value)


def _pivot_failed(tiers: Tiers, saga_id: str, error: str, pivot_attempts: int) -> ReapOutcome:
    """Count the reaper's failed re-run of a saga's pivot; the ``pivot_attempts``-th moves it to ``dead``.

    Dead, not compensated: every one of these failures left the pivot's outcome to be read from the
    saga log, and a pivot failing this way on every pass is a CP tier in trouble (conflicts, dropped
    connections, a standby not confirming), for an operator to look at rather than a reason to throw
    the saga's work away.  Whether a pivot landed after all is read as before: it moves the saga to
    ``committed`` in its own transaction, and only a saga still ``running`` is counted or
    dead-lettered, in one transaction (so a pivot committing meanwhile makes it re-run, not lie).
    """

    def tx(conn: Connection) -> tuple[SagaStatus, int] | None:
        now = utcnow()
        counted = sagas.count_pivot_reap(conn, saga_id, now=now)
        if counted is None or counted[1] < pivot_attempts:
            return counted
        reason = (
            f"commit_cp failed with a retryable error on {counted[1]} reaper passes"
            f" (DATAMESH_REAPER_PIVOT_ATTEMPTS={pivot_attempts}); the last: {error}; nothing undone:"
            f" `sagas retry {saga_id}` re-runs the pivot"
        )
        return (SagaStatus.DEAD, counted[1]) if sagas.dead_at_pivot(conn, saga_id, now=now, error=reason) else counted

    counted = tiers.cp.run(tx, operation="reaper.pivot_failed")
    if isinstance(counted, Err):  # not counted: this pass is tried again, as before the bound
        return ReapOutcome(saga_id, f"error: commit_cp: {error}")
    if counted.value is None:
        return ReapOutcome(saga_id, "skipped")
    status, count = counted.value
    if status == SagaStatus.DEAD:
        compensation._count_dead(tiers, saga_id)
        return ReapOutcome(saga_id, SagaStatus.DEAD.value)
    if status != SagaStatus.RUNNING:
        return ReapOutcome(saga_id, status.value)  # the pivot landed after all, or another reaper moved it
    return ReapOutcome(saga_id, f"error: commit_cp (reaper attempt {count} of {pivot_attempts}): {error}")
