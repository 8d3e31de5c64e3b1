"""Operator commands: ``migrate``, ``sagas``, ``reap``, ``provenance verify``."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, Any

from datamesh.core.config import DataMeshConfig
from datamesh.core.result import Err
from datamesh.pipeline import compensation
from datamesh.pipeline.saga import ReapOutcome, reap, redrive_pivot
from datamesh.pipeline.tiers import Tiers, engine_for, reader_engine_for
from datamesh.storage.cp import migrate, provenance, sagas
from datamesh.storage.cp.database import CpDatabase
from datamesh.storage.cp.sagas import SagaStatus
from datamesh.storage.cp.sql import utcnow

if TYPE_CHECKING:
    import redis
    from celery import Celery


def register(sub: Any) -> None:
    m = sub.add_parser("migrate", help="apply the CP tier's Alembic migrations")
    m.add_argument("--revision", default="head")
    m.add_argument("--downgrade", action="store_true", help="downgrade to --revision instead")
    m.set_defaults(handler=_migrate)

    s = sub.add_parser("sagas", help="list sagas by state, or re-drive one")
    s.add_argument("--dead", action="store_true", help="list dead-lettered sagas")
    s.add_argument("--status", choices=[x.value for x in SagaStatus], help="list sagas in this state")
    s.add_argument(
        "action",
        nargs="?",
        choices=["retry"],
        help="retry: compensate a dead or stuck saga again; re-run the pivot of one the reaper dead-lettered there",
    )
    s.add_argument("saga_id", nargs="?")
    s.set_defaults(handler=_sagas)

    r = sub.add_parser("reap", help="finish or compensate sagas whose lease expired")
    r.set_defaults(handler=_reap)

    p = sub.add_parser("provenance", help="provenance chains")
    p.add_argument("action", choices=["verify"])
    p.add_argument("conversation_id", nargs="?", help="one conversation (default: every conversation)")
    p.set_defaults(handler=_provenance)


def _open_db(config: DataMeshConfig) -> CpDatabase | None:
    db = CpDatabase.open(config.resolved_cp_url)
    if isinstance(db, Err):
        print(f"error: {db.error}")
        return None
    return db.value


def _migrate(args: argparse.Namespace, config: DataMeshConfig) -> int:
    db = _open_db(config)
    if db is None:
        return 2
    done = migrate.downgrade(db, args.revision) if args.downgrade else migrate.upgrade(db, args.revision)
    db.dispose()
    if isinstance(done, Err):
        print(f"error: {done.error}")
        return 1
    print(f"CP schema at revision {done.value}")
    return 0


def _with_tiers(config: DataMeshConfig) -> Tiers | None:
    # Under the Celery executor the workers own the AP shards: this process only reads them.
    celery = config.executor == "celery"
    factory = reader_engine_for(config) if celery else engine_for(config.ap_engine, config)
    tiers = Tiers.open(config, engine_factory=factory)
    if isinstance(tiers, Err):
        print(f"error: {tiers.error}")
        return None
    return tiers.value


def _sagas(args: argparse.Namespace, config: DataMeshConfig) -> int:
    tiers = _with_tiers(config)
    if tiers is None:
        return 2
    try:
        if args.action == "retry":
            if not args.saga_id:
                print("error: sagas retry needs a SAGA_ID")
                return 2
            refused = _not_redrivable(tiers, args.saga_id)
            if refused is not None:
                print(f"error: {refused}")
                return 1
            forward = _redrive_pivot(tiers, config, args.saga_id)
            if forward is not None:
                print(f"{args.saga_id}: {forward.action}")
                return 1 if forward.action.startswith("error") else 0
            if config.executor == "celery":
                return _redrive_on_celery(tiers, config, args.saga_id)
            outcome = compensation.compensate_with_retries(tiers, args.saga_id, failed_step="retry", error="re-driven")
            print(f"{args.saga_id}: {outcome.value if not isinstance(outcome, Err) else outcome.error}")
            return 0 if not isinstance(outcome, Err) else 1
        status = SagaStatus.DEAD if args.dead else SagaStatus(args.status) if args.status else None
        if status is None:
            counts = tiers.cp.run(sagas.count_by_status, operation="cli.sagas", write=False).unwrap()
            for name in SagaStatus:
                print(f"{name.value:13} {counts.get(name.value, 0)}")
            return 0
        ids = tiers.cp.run(lambda c: sagas.list_by_status(c, status, limit=1000), operation="cli.sagas", write=False)
        for saga_id in ids.unwrap():
            record = tiers.cp.run(partial(sagas.load, saga_id=saga_id), operation="cli.sagas", write=False).unwrap()
            if record is not None:
                print(f"{saga_id} {record.status.value} step={record.failed_step} error={record.error}")
        return 0
    finally:
        tiers.close()


def _not_redrivable(tiers: Tiers, saga_id: str) -> str | None:
    """Why ``sagas retry`` must leave ``saga_id`` alone, or ``None``: only a dead saga, or a stuck one
    (running or compensating, its lease expired: no live driver), is compensated again."""
    record = tiers.cp.run(partial(sagas.load, saga_id=saga_id), operation="cli.sagas.retry", write=False)
    if isinstance(record, Err):
        return str(record.error)
    if record.value is None:
        return f"no saga {saga_id}"
    return sagas.redrive_refusal(record.value, now=utcnow())


def _redrive_pivot(tiers: Tiers, config: DataMeshConfig, saga_id: str) -> ReapOutcome | None:
    """A saga the reaper dead-lettered at its pivot is driven forward again (its pivot re-run, its
    count reset), not compensated; ``None`` for any other saga."""
    if config.executor != "celery":
        return redrive_pivot(tiers, saga_id, pivot_attempts=config.reaper_pivot_attempts)
    from datamesh.tasks.reaper import redrive_pivot_distributed

    with _celery(config) as (app, broker):
        return redrive_pivot_distributed(app, tiers, broker, saga_id, pivot_attempts=config.reaper_pivot_attempts)


@contextmanager
def _celery(config: DataMeshConfig) -> Iterator[tuple[Celery, redis.Redis]]:
    """The Celery app and broker client of a command that settles sagas as the reaper does."""
    import redis

    from datamesh.workers.app import create_app

    broker = redis.Redis.from_url(config.broker_url, socket_timeout=10)
    try:
        yield create_app(config, load_celeryconfig=False), broker
    finally:
        broker.close()


def _redrive_on_celery(tiers: Tiers, config: DataMeshConfig, saga_id: str) -> int:
    """A fresh compensation attempt count (a stuck saga to ``compensating``), then the workers
    compensate it again."""
    from datamesh.workers import queues
    from datamesh.workers.app import create_app

    moved = tiers.cp.run(
        lambda c: sagas.redrive(c, saga_id, now=utcnow(), lease_s=tiers.queue_lease_s), operation="cli.sagas.retry"
    )
    if isinstance(moved, Err) or not moved.value:
        print(f"{saga_id}: {moved.error if isinstance(moved, Err) else 'not dead or in flight: nothing to re-drive'}")
        return 1
    app = create_app(config, load_celeryconfig=False)
    app.signature(queues.COMPENSATE, kwargs={"saga_id": saga_id}).apply_async()
    print(f"{saga_id}: compensation enqueued")
    return 0


def _reap(args: argparse.Namespace, config: DataMeshConfig) -> int:
    tiers = _with_tiers(config)
    if tiers is None:
        return 2
    try:
        if config.executor == "celery":
            from datamesh.tasks.reaper import reap_distributed

            with _celery(config) as (app, broker):
                outcomes = reap_distributed(app, tiers, broker, pivot_attempts=config.reaper_pivot_attempts)
        else:
            outcomes = reap(tiers, pivot_attempts=config.reaper_pivot_attempts)
        for outcome in outcomes:
            print(f"{outcome.saga_id} {outcome.action}")
        print(f"{len(outcomes)} expired sagas handled")
        return 0
    finally:
        tiers.close()


def _provenance(args: argparse.Namespace, config: DataMeshConfig) -> int:
    tiers = _with_tiers(config)
    if tiers is None:
        return 2
    try:
        from sqlalchemy import select

        from datamesh.storage.cp.conversations import CONVERSATIONS

        if args.conversation_id:
            ids = [args.conversation_id]
        else:
            ids = tiers.cp.run(
                lambda c: [r.id for r in c.execute(select(CONVERSATIONS.c.id))], operation="cli.provenance", write=False
            ).unwrap()
        broken = 0
        for cid in ids:
            _checked, failure = tiers.cp.run(
                partial(provenance.verify, conversation_id=cid), operation="cli.provenance", write=False
            ).unwrap()
            if failure is not None:
                broken += 1
                print(
                    f"BROKEN {cid} at record {failure.seq}: {failure.reason} "
                    f"(expected {failure.expected}, found {failure.actual})"
                )
        print(f"{len(ids)} chains verified, {broken} broken")
        return 1 if broken else 0
    finally:
        tiers.close()
