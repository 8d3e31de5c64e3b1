"""The saga log: a row per saga and a row per step, written with the step's own CP writes.

Statuses: ``running`` → ``committed`` (the pivot committed) or ``running`` → ``compensating`` →
``compensated`` (or ``dead`` after too many failed compensation attempts), or ``running`` → ``dead``
when the reaper's re-runs of the pivot kept failing retryably (re-driven back to ``running``).  The pivot only commits
a ``running`` saga and compensation only claims a ``running`` one, so the two can never both win.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, cast

from sqlalchemy import Table, bindparam, case, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from datamesh.models.tables import Saga, SagaStep
from datamesh.storage.cp.sql import as_utc, bulk_insert

SAGAS = cast(Table, Saga.__table__)
STEPS = cast(Table, SagaStep.__table__)


class SagaStatus(StrEnum):
    RUNNING = "running"
    COMMITTED = "committed"
    COMPENSATING = "compensating"
    COMPENSATED = "compensated"
    DEAD = "dead"


FINAL_STATUSES = frozenset({SagaStatus.COMMITTED, SagaStatus.COMPENSATED, SagaStatus.DEAD})
"""States no step leaves (``dead`` only by an explicit re-drive)."""


class StepState(StrEnum):
    RUNNING = "running"  # a delivery of the step started (distributed executor); attempts counts them
    DONE = "done"
    FAILED = "failed"
    COMPENSATED = "compensated"


@dataclass(frozen=True, slots=True)
class SagaRecord:
    saga_id: str
    status: SagaStatus
    tenant: str
    plan_json: str
    steps: dict[str, StepState]
    failed_step: str | None
    error: str | None
    attempts: int
    lease_expires_at: datetime
    created_at: datetime
    updated_at: datetime


def create(conn: Connection, saga_id: str, tenant: str, plan_json: str, *, now: datetime, lease_s: float) -> None:
    # COPY on PostgreSQL: the plan of a large batch is megabytes, cheaper streamed than quoted
    bulk_insert(
        conn,
        SAGAS,
        [
            {
                "id": saga_id,
                "kind": "ingest",
                "status": SagaStatus.RUNNING.value,
                "tenant": tenant,
                "plan": plan_json,
                "attempts": 0,
                "lease_expires_at": now + timedelta(seconds=lease_s),
                "created_at": now,
                "updated_at": now,
            }
        ],
    )


def record_step(
    conn: Connection,
    saga_id: str,
    step: str,
    state: StepState,
    *,
    now: datetime,
    lease_s: float,
    error: str | None = None,
) -> None:
    """Record a step's state and extend the saga's lease (the saga is alive).

    Runs on every step of every saga: the statements are built once per dialect and reused, so
    SQLAlchemy's compiled cache serves them.
    """
    conn.execute(
        _step_upsert(conn.dialect.name),
        {"saga_id": saga_id, "step": step, "state": state.value, "attempts": 1, "error": error, "updated_at": now},
    )
    conn.execute(_EXTEND_LEASE, {"sid": saga_id, "lease": now + timedelta(seconds=lease_s), "now": now})


_EXTEND_LEASE = (
    update(SAGAS)
    .where(SAGAS.c.id == bindparam("sid"))
    .values(lease_expires_at=bindparam("lease"), updated_at=bindparam("now"))
)


def relet(conn: Connection, saga_id: str, status: SagaStatus, *, now: datetime, lease_s: float) -> bool:
    """Give a saga still in ``status`` the lease ``now + lease_s`` (``False``: it had moved on)."""
    return transition(conn, saga_id, from_status=(status,), to_status=status, now=now, lease_s=lease_s)


def renew_lease(conn: Connection, saga_id: str, *, now: datetime, lease_s: float) -> bool:
    """A running step's heartbeat: move a running saga's lease out to ``now + lease_s``, never back
    (a step that just handed the saga to a queue gave it the longer queue timeout)."""
    lease = now + timedelta(seconds=lease_s)
    moved = conn.execute(
        update(SAGAS)
        .where(SAGAS.c.id == saga_id, SAGAS.c.status == SagaStatus.RUNNING.value, SAGAS.c.lease_expires_at < lease)
        .values(lease_expires_at=lease, updated_at=now)
    )
    return bool(moved.rowcount)


_STEP_UPSERTS: dict[str, Any] = {}


def _step_upsert(dialect_name: str) -> Any:
    stmt = _STEP_UPSERTS.get(dialect_name)
    if stmt is None:
        insert = (postgresql if dialect_name == "postgresql" else sqlite).insert(STEPS)
        stmt = insert.on_conflict_do_update(
            index_elements=["saga_id", "step"],
            set_={c: insert.excluded[c] for c in ("state", "error", "updated_at")},
        )
        _STEP_UPSERTS[dialect_name] = stmt
    return stmt


@dataclass(frozen=True, slots=True)
class Delivery:
    """What :func:`begin_step` found: the saga's status (``None``: no such saga), the step's delivery
    count, and whether the step was already done (a late duplicate: nothing counted)."""

    status: SagaStatus | None
    attempts: int
    done: bool = False


def begin_step(conn: Connection, saga_id: str, step: str, *, now: datetime, lease_s: float) -> Delivery:
    """Count one more delivery of ``step`` and extend the lease.

    The count is the redelivery cap's input: a message that keeps killing its worker is redelivered
    (``task_reject_on_worker_lost``) and would otherwise loop for ever.  A step already ``done`` is
    not counted: a late duplicate of a step that succeeded must never trip the cap (and fail, and
    compensate, a saga whose steps all succeeded); it has nothing left to do.
    """
    status = status_of(conn, saga_id)
    if status is None:
        return Delivery(None, 0)
    row = conn.execute(
        select(STEPS.c.attempts, STEPS.c.state).where(STEPS.c.saga_id == saga_id, STEPS.c.step == step)
    ).first()
    if row is not None and row.state == StepState.DONE.value:
        return Delivery(status, int(row.attempts or 0), done=True)
    if row is None:
        conn.execute(
            STEPS.insert(),
            {"saga_id": saga_id, "step": step, "state": StepState.RUNNING.value, "attempts": 1, "updated_at": now},
        )
        attempts = 1
    else:
        attempts = int(row.attempts or 0) + 1
        conn.execute(
            update(STEPS)
            .where(STEPS.c.saga_id == saga_id, STEPS.c.step == step)
            .values(attempts=attempts, updated_at=now)
        )
    if status == SagaStatus.RUNNING:
        conn.execute(
            update(SAGAS)
            .where(SAGAS.c.id == saga_id)
            .values(lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now)
        )
    return Delivery(status, attempts)


_UNDOING = (SagaStatus.COMPENSATING.value, SagaStatus.DEAD.value)


def start_undo(conn: Connection, saga_id: str, *, now: datetime) -> tuple[SagaStatus, int] | None:
    """Count a compensation attempt *before* it runs; returns the saga's status and its attempts.

    Counted first so that an undo which never reports back (its worker killed on every delivery,
    or stopped by the task time limit) still spends the saga's attempts and ends dead-lettered; an
    undo that succeeds gives its attempt back (:func:`undo_succeeded`).  Only a compensating or
    dead (re-driven) saga is counted; ``None`` when the saga does not exist.
    """
    conn.execute(
        update(SAGAS)
        .where(SAGAS.c.id == saga_id, SAGAS.c.status.in_(_UNDOING))
        .values(attempts=SAGAS.c.attempts + 1, updated_at=now)
    )
    _reset_redrives(conn, saga_id)
    row = conn.execute(select(SAGAS.c.status, SAGAS.c.attempts).where(SAGAS.c.id == saga_id)).first()
    return (SagaStatus(row.status), int(row.attempts)) if row else None


#: The saga-log row counting a compensating saga's re-drives since one of its undos last started.
REDRIVES_STEP = "compensation.redrives"


def count_redrive(conn: Connection, saga_id: str, *, now: datetime) -> tuple[SagaStatus, int] | None:
    """Count a compensating saga's re-drive by the reaper; its status and the re-drives since one of
    its undos last started (:func:`start_undo` resets the count).

    The reaper re-drives a compensating saga when its lease ran out: its compensation never reported
    back.  An undo that started has counted its own attempt; one that never starts (its messages
    lost, or waiting on a queue nobody consumes) counts only here, so that it too ends dead-lettered
    instead of being enqueued again every queue timeout for ever.  Any other saga is left as it is.
    """
    status = status_of(conn, saga_id)
    if status != SagaStatus.COMPENSATING:
        return None if status is None else (status, 0)
    return status, _count(conn, saga_id, REDRIVES_STEP, now=now)


#: The saga-log row counting the reaper's re-runs of a running saga's pivot that failed with a
#: retryable error; its state is ``failed`` once they dead-lettered the saga.
PIVOT_REAPS_STEP = "commit_cp.reaps"


def count_pivot_reap(conn: Connection, saga_id: str, *, now: datetime) -> tuple[SagaStatus, int] | None:
    """Count a reaper's re-run of a saga's pivot that failed with a retryable error; the saga's status
    and the count (``None``: no such saga).

    Only a running saga is counted.  The pivot moves the saga to ``committed`` in its own transaction,
    so a pivot that landed after all (a commit in doubt that did commit) shows here as ``committed``,
    with nothing counted.
    """
    status = status_of(conn, saga_id)
    if status != SagaStatus.RUNNING:
        return None if status is None else (status, 0)
    return status, _count(conn, saga_id, PIVOT_REAPS_STEP, now=now)


def dead_at_pivot(conn: Connection, saga_id: str, *, now: datetime, error: str) -> bool:
    """Move a still running saga to ``dead`` with ``error``, its pivot's re-runs spent; ``False`` if
    it had moved on (committed, or claimed for compensation).  Nothing is undone: see
    :func:`revive_at_pivot`."""
    moved = transition(
        conn,
        saga_id,
        from_status=(SagaStatus.RUNNING,),
        to_status=SagaStatus.DEAD,
        now=now,
        failed_step="commit_cp",
        error=error,
    )
    if moved:
        conn.execute(
            update(STEPS)
            .where(STEPS.c.saga_id == saga_id, STEPS.c.step == PIVOT_REAPS_STEP)
            .values(state=StepState.FAILED.value, updated_at=now)
        )
    return moved


def revive_at_pivot(conn: Connection, saga_id: str, *, now: datetime) -> bool:
    """``sagas retry`` of a saga :func:`dead_at_pivot` dead-lettered: it is running again, its pivot
    re-runs counted from zero and its lease expired (so a reaper takes it if the re-driver dies);
    ``False`` for any other saga (a dead saga whose compensation started is compensated instead)."""
    pivot_dead = conn.execute(
        select(STEPS.c.saga_id).where(
            STEPS.c.saga_id == saga_id, STEPS.c.step == PIVOT_REAPS_STEP, STEPS.c.state == StepState.FAILED.value
        )
    ).first()
    if pivot_dead is None:
        return False
    if not transition(conn, saga_id, from_status=(SagaStatus.DEAD,), to_status=SagaStatus.RUNNING, now=now):
        return False
    conn.execute(update(SAGAS).where(SAGAS.c.id == saga_id).values(attempts=0, lease_expires_at=now))
    conn.execute(
        update(STEPS)
        .where(STEPS.c.saga_id == saga_id, STEPS.c.step == PIVOT_REAPS_STEP)
        .values(state=StepState.RUNNING.value, attempts=0, updated_at=now)
    )
    return True


def _count(conn: Connection, saga_id: str, step: str, *, now: datetime) -> int:
    """Add one to the ``attempts`` of the saga's bookkeeping row ``step`` (made on first use)."""
    where = (STEPS.c.saga_id == saga_id, STEPS.c.step == step)
    row = conn.execute(select(STEPS.c.attempts).where(*where)).first()
    count = 1 if row is None else int(row.attempts or 0) + 1
    if row is None:
        values = {"saga_id": saga_id, "step": step, "state": StepState.RUNNING.value, "updated_at": now}
        conn.execute(STEPS.insert(), {**values, "attempts": count})
    else:
        conn.execute(update(STEPS).where(*where).values(attempts=count, updated_at=now))
    return count


def undo_succeeded(conn: Connection, saga_id: str, *, now: datetime) -> None:
    """Give back the attempt :func:`start_undo` counted, never below zero (a re-drive may have reset
    it), whatever the status: the last undo moves the saga to ``compensated`` before it returns."""
    conn.execute(
        update(SAGAS)
        .where(SAGAS.c.id == saga_id)
        .values(attempts=case((SAGAS.c.attempts > 0, SAGAS.c.attempts - 1), else_=0), updated_at=now)
    )


_STUCK = (SagaStatus.RUNNING, SagaStatus.COMPENSATING)


def redrive_refusal(record: SagaRecord, *, now: datetime) -> str | None:
    """Why :func:`redrive` leaves this saga alone, or ``None`` if it takes it: a dead saga, or a
    stuck one (running or compensating, its lease expired: no live driver)."""
    if record.status == SagaStatus.DEAD or (record.status in _STUCK and record.lease_expires_at < now):
        return None
    if record.status in _STUCK:
        return (
            f"saga {record.saga_id} is {record.status.value} and its driver's lease is live until "
            f"{record.lease_expires_at.isoformat()}: only dead or stuck sagas are re-driven"
        )
    return f"saga {record.saga_id} is {record.status.value}: nothing to re-drive"


def redrive(conn: Connection, saga_id: str, *, now: datetime, lease_s: float) -> bool:
    """Give a dead saga, or a stuck one (running or compensating with its lease expired), a fresh
    compensation attempt count and lease; ``False`` for any other saga (a live one is left alone).

    A dead saga stays ``dead`` until its compensation completes (``undo_reserve`` moves it to
    ``compensated``): the no-loss ledger counts it dead-lettered until then, and whichever process
    finishes the compensation moves it out (see :mod:`datamesh.observability.ledger`).  A stuck saga
    becomes ``compensating``.
    """
    stuck = [status.value for status in _STUCK]  # the same rule as redrive_refusal, atomically
    dead = conn.execute(
        update(SAGAS)
        .where(SAGAS.c.id == saga_id, SAGAS.c.status == SagaStatus.DEAD.value)
        .values(attempts=0, lease_expires_at=now + timedelta(seconds=lease_s), updated_at=now)
    )
    if dead.rowcount == 1:
        _reset_redrives(conn, saga_id)
        return True
    result = conn.execute(
        update(SAGAS)
        .where(SAGAS.c.id == saga_id, SAGAS.c.status.in_(stuck), SAGAS.c.lease_expires_at < now)
        .values(
            status=SagaStatus.COMPENSATING.value,
            attempts=0,
            lease_expires_at=now + timedelta(seconds=lease_s),
            updated_at=now,
        )
    )
    if result.rowcount != 1:
        return False
    _reset_redrives(conn, saga_id)
    return True


def _reset_redrives(conn: Connection, saga_id: str) -> None:
    conn.execute(update(STEPS).where(STEPS.c.saga_id == saga_id, STEPS.c.step == REDRIVES_STEP).values(attempts=0))


def mark_all_compensated(conn: Connection, saga_id: str, *, now: datetime) -> None:
    """Every step row of the saga (including per-shard parts) ends ``compensated``."""
    conn.execute(
        update(STEPS).where(STEPS.c.saga_id == saga_id).values(state=StepState.COMPENSATED.value, updated_at=now)
    )


def transition(
    conn: Connection,
    saga_id: str,
    *,
    from_status: tuple[SagaStatus, ...],
    to_status: SagaStatus,
    now: datetime,
    lease_s: float = 0.0,
    failed_step: str | None = None,
    error: str | None = None,
    count_attempt: bool = False,
) -> bool:
    """Move the saga to ``to_status`` if it is in one of ``from_status``; True when it moved."""
    values: dict[str, object] = {"status": to_status.value, "updated_at": now}
    if lease_s:
        values["lease_expires_at"] = now + timedelta(seconds=lease_s)
    if failed_step is not None:
        values["failed_step"] = failed_step
    if error is not None:
        values["error"] = error[:2000]
    if count_attempt:
        values["attempts"] = SAGAS.c.attempts + 1
    result = conn.execute(
        update(SAGAS).where(SAGAS.c.id == saga_id, SAGAS.c.status.in_([s.value for s in from_status])).values(**values)
    )
    return result.rowcount == 1


def status_of(conn: Connection, saga_id: str) -> SagaStatus | None:
    outcome = outcome_of(conn, saga_id)
    return outcome[0] if outcome else None


def outcome_of(conn: Connection, saga_id: str) -> tuple[SagaStatus, str | None, str | None] | None:
    """``(status, failed_step, error)`` of a saga: what its waiting caller answers (not the plan)."""
    row = conn.execute(select(SAGAS.c.status, SAGAS.c.failed_step, SAGAS.c.error).where(SAGAS.c.id == saga_id)).first()
    return (SagaStatus(row.status), row.failed_step, row.error) if row else None


def load(conn: Connection, saga_id: str) -> SagaRecord | None:
    row = conn.execute(select(SAGAS).where(SAGAS.c.id == saga_id)).first()
    if row is None:
        return None
    steps = {r.step: StepState(r.state) for r in conn.execute(select(STEPS).where(STEPS.c.saga_id == saga_id))}
    return SagaRecord(
        saga_id=row.id,
        status=SagaStatus(row.status),
        tenant=row.tenant,
        plan_json=row.plan,
        steps=steps,
        failed_step=row.failed_step,
        error=row.error,
        attempts=row.attempts,
        lease_expires_at=as_utc(row.lease_expires_at),
        created_at=as_utc(row.created_at),
        updated_at=as_utc(row.updated_at),
    )


def expired(conn: Connection, *, now: datetime, limit: int = 100) -> list[str]:
    """Sagas still in flight whose lease ran out (their driver died or lost its message)."""
    rows = conn.execute(
        select(SAGAS.c.id)
        .where(
            SAGAS.c.status.in_([SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value]),
            SAGAS.c.lease_expires_at < now,
        )
        .order_by(SAGAS.c.lease_expires_at)
        .limit(limit)
    )
    return [r.id for r in rows]


def list_by_status(conn: Connection, status: SagaStatus, *, limit: int = 100) -> list[str]:
    rows = conn.execute(
        select(SAGAS.c.id).where(SAGAS.c.status == status.value).order_by(SAGAS.c.created_at).limit(limit)
    )
    return [r.id for r in rows]


def count_by_status(conn: Connection) -> dict[str, int]:
    rows = conn.execute(select(SAGAS.c.status, func.count()).group_by(SAGAS.c.status))
    return {r[0]: int(r[1]) for r in rows}


def summary(conn: Connection, *, now: datetime) -> tuple[dict[str, int], float]:
    """Sagas by status, and the age in seconds of the oldest running or compensating one (0 if none)."""
    oldest = conn.execute(
        select(func.min(SAGAS.c.created_at)).where(
            SAGAS.c.status.in_([SagaStatus.RUNNING.value, SagaStatus.COMPENSATING.value])
        )
    ).scalar()
    age = 0.0 if oldest is None else max(0.0, (now - as_utc(oldest)).total_seconds())
    return count_by_status(conn), age
