"""Failures on the Celery executor: a step failing on purpose, killed workers, a poison message, a duplicate."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import fields
from pathlib import Path
from typing import Any

import redis
from prometheus_client import REGISTRY, CollectorRegistry, multiprocess
from sqlalchemy import select

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import SagaFailed
from datamesh.core.result import Err
from datamesh.observability import ledger
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.pipeline.plan import SagaPlan
from datamesh.pipeline.steps import Step
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sagas import SagaStatus, StepState
from datamesh.workers.executor import CeleryExecutor
from tests.celery.conftest import Workers, eventually, run_cli, runs_per_node
from tests.helpers import counts_after_gc, real_requests, tier_counts
from tests.test_saga_faults import FAULT_POINTS, FailAt, batch_with_blobs


async def test_failure_at_each_step_is_compensated_by_the_workers(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str
) -> None:
    control = redis.Redis.from_url(redis_url)
    workers.start("--role", "all", hooks_redis=redis_url)
    workers.wait_ready()
    reserve_fault = FailAt(Step.RESERVE, "after", armed=False)  # reserve runs in the caller
    async with (await IngestionPipeline.create(celery_config, faults=reserve_fault)).unwrap() as p:
        for step, phase in FAULT_POINTS:
            # Given a fault armed at one step (in the caller for reserve, in the workers otherwise),
            reserve_fault.armed = step == Step.RESERVE
            control.set("dm:test:fault", f"{step}:{phase}")
            requests = batch_with_blobs(celery_config)
            # when a batch with inline and object-store payloads in two regions is ingested,
            results = (await p.ingest_many(requests)).unwrap()
            # then every item reports the failed saga at that step,
            assert all(isinstance(r, Err) and isinstance(r.error, SagaFailed) for r in results), (
                step,
                phase,
                results[0],
            )
            failure = results[0].error
            assert isinstance(failure, SagaFailed) and failure.step == step and not failure.dead_lettered, failure
            # no reference is left, and once garbage collection has run every tier is empty but for
            # the compensated saga records,
            assert tier_counts(p.tiers).rows["object_refs"] == 0
            counts = counts_after_gc(p.tiers)
            assert counts.stored() == 0 and counts.ap_rows == 0 and counts.blobs == 0, (step, phase, counts)
            assert counts.rows["object_refs"] == 0 and counts.rows["blobs"] == 0
            assert counts.rows["idempotency_keys"] == 0 and counts.rows["provenance_records"] == 0
            record = p.tiers.cp.run(lambda c, s=failure.saga_id: sagas.load(c, s), operation="t").unwrap()
            assert record is not None and record.status == SagaStatus.COMPENSATED and record.failed_step == step
            assert set(record.steps.values()) == {StepState.COMPENSATED}
        # and with the fault cleared the same requests succeed.
        control.delete("dm:test:fault")
        reserve_fault.armed = False
        retried = (await p.ingest_many(requests)).unwrap()
        assert all(r.is_ok() and not r.unwrap().deduplicated for r in retried)
        statuses = p.tiers.cp.run(sagas.count_by_status, operation="t").unwrap()
        assert statuses == {SagaStatus.COMPENSATED.value: len(FAULT_POINTS), SagaStatus.COMMITTED.value: 1}
        # and no saga, compensated or committed, left its stashed content in the broker.
        assert list(control.scan_iter("dm:saga-parts:*")) == []
    control.close()


async def test_the_same_messages_delivered_twice_make_one_conversation(
    workers: Workers, celery_config: DataMeshConfig
) -> None:
    workers.start("--role", "all")
    workers.wait_ready()
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        executor = p._executor
        assert isinstance(executor, CeleryExecutor)
        # Given a saga's first message captured as it is published,
        plan, first = submit_capturing_first_message(p, real_requests(5))
        # and the very same message (same task id, same body, the rest of the chain in it) sent again,
        # as a redelivery would: every step of the saga then runs twice, under the same task ids,
        publish_again(p, first)
        committed = executor.wait(plan).unwrap()
        # when both deliveries of every step have run (the workers' own counts say so),
        once = {"datamesh.write_ap": len({(i.region, i.shard) for i in plan.items}), "datamesh.commit_cp": 1}
        assert first["headers"]["task"] == "datamesh.write_ap" and not plan.blobs
        runs: dict[str, int] = {}
        for _ in range(200):
            stats = executor.app.control.inspect(timeout=1.0).stats() or {}
            runs = {name: sum(s.get("total", {}).get(name, 0) for s in stats.values()) for name in once}
            if all(runs[name] >= 2 * n for name, n in once.items()):
                break
            await asyncio.sleep(0.1)
        assert runs == {name: 2 * n for name, n in once.items()}, (runs, once)
        # then there is one conversation per request and nothing twice.
        assert len(committed) == 5
        counts = tier_counts(p.tiers)
        assert counts.rows["conversations"] == 5 and counts.rows["turns"] == 5 and counts.ap_rows == 5
        assert p.tiers.cp.run(sagas.count_by_status, operation="t").unwrap() == {SagaStatus.COMMITTED.value: 1}


def _ledger(before: ledger.Ledger, multiproc: Path) -> ledger.Ledger:
    """This process's ledger since ``before`` plus the workers' (a multiprocess directory)."""
    merged = CollectorRegistry()
    multiprocess.MultiProcessCollector(merged, path=str(multiproc))  # type: ignore[no-untyped-call]
    here, there = ledger.snapshot(REGISTRY) - before, ledger.snapshot(merged)
    return ledger.Ledger(**{f.name: getattr(here, f.name) + getattr(there, f.name) for f in fields(ledger.Ledger)})


async def test_compensation_that_keeps_failing_is_dead_lettered_then_redriven(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str, tmp_path: Path
) -> None:

    control = redis.Redis.from_url(redis_url)
    # Given a step that fails and an undo of it that keeps failing, with two compensation attempts allowed,
    control.set("dm:test:fault", "write_ap:before,undo_write_ap:before")
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    before = ledger.snapshot(REGISTRY)
    workers.start(
        "--role",
        "all",
        hooks_redis=redis_url,
        DATAMESH_COMPENSATION_ATTEMPTS="2",
        PROMETHEUS_MULTIPROC_DIR=str(multiproc),
    )
    workers.wait_ready()
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        results = (await p.ingest_many(real_requests(4))).unwrap()
        # then the saga is dead-lettered and reported so,
        failure = results[0].error
        assert isinstance(failure, SagaFailed) and failure.dead_lettered, failure
        # and the no-loss ledger holds its 4 turns as dead-lettered, none in flight;
        dead = _ledger(before, multiproc)
        assert (dead.accepted, dead.dead_letter, dead.in_flight, dead.compensated) == (4, 4, 0, 0), dead
        cli = functools.partial(run_cli, celery_config)
        # `sagas --dead` lists it;
        assert failure.saga_id in cli("sagas", "--dead")
        # re-driven while the cause remains, it counts its attempts again and stops at the limit, dead
        # (not retried for ever), and the ledger counts it dead once;
        assert "compensation enqueued" in cli("sagas", "retry", failure.saga_id)

        def redrive_gave_up() -> None:
            record = p.tiers.cp.run(lambda c: sagas.load(c, failure.saga_id), operation="t", write=False).unwrap()
            assert record is not None and record.status == SagaStatus.DEAD and record.attempts == 2, record

        await eventually(redrive_gave_up)
        assert failure.saga_id in cli("sagas", "--dead")
        redrive_gave_up()  # still at the limit a CLI run later: no undo ran again
        again = _ledger(before, multiproc)
        assert (again.dead_letter, again.in_flight, again.compensated) == (4, 0, 0), again
        # once the cause is fixed, `sagas retry ID` re-drives it to compensated and every tier is clean.
        control.delete("dm:test:fault")
        assert "compensation enqueued" in cli("sagas", "retry", failure.saga_id)
        for _ in range(100):
            status = (await p.saga_status(failure.saga_id)).unwrap()
            if status == SagaStatus.COMPENSATED:
                break
            await asyncio.sleep(0.1)
        assert status == SagaStatus.COMPENSATED
        counts = tier_counts(p.tiers)
        assert counts.stored() == 0 and counts.rows["idempotency_keys"] == 0
        # and the ledger moves the 4 turns from dead-lettered to compensated.
        undone = _ledger(before, multiproc)
        assert (undone.dead_letter, undone.in_flight, undone.compensated) == (0, 0, 4), undone
    control.close()


async def test_a_step_that_kills_its_worker_on_every_delivery_is_capped_and_compensated(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str
) -> None:
    from sqlalchemy import select

    from tests.celery.test_kills import assert_consistent

    cap = 3
    control = redis.Redis.from_url(redis_url)
    # Given a write_ap step that SIGKILLs its pool process on every delivery (a poison message, which
    # acks_late and reject_on_worker_lost put back on its queue each time), and 3 deliveries allowed,
    # and a running lease longer than the gap between two deliveries: the worker's main process may
    # notice a dead pool process only on its pool-maintenance tick (every 5 s), so under the suite's
    # 3 s lease the reaper could take the saga between two deliveries, before the cap.
    config = workers.config = celery_config.with_changes(step_max_deliveries=cap, saga_lease_s=20.0)
    control.set("dm:test:crash_always", f"{Step.WRITE_AP}:before")
    main = workers.start("--role", "all", hooks_redis=redis_url)
    workers.wait_ready()
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        # when a batch with inline and object-store payloads in two regions is ingested (nothing but
        # the cap can end this saga: no beat runs, so no reaper),
        results = (await p.ingest_many(batch_with_blobs(config))).unwrap()
        # then every item reports the saga failed at write_ap, the cap named in the error, not dead-lettered,
        assert all(isinstance(r, Err) and isinstance(r.error, SagaFailed) for r in results), results[0]
        failure = results[0].error
        assert isinstance(failure, SagaFailed) and failure.step == Step.WRITE_AP and not failure.dead_lettered
        assert f"delivered {cap + 1} times (cap {cap})" in failure.message, failure
        # the step ran (and killed its process) on exactly `cap` deliveries, and the saga log counted
        # one delivery more: the one that begin() failed before the step ran (count > cap fails);
        assert int(control.get("dm:test:crashes") or 0) == cap
        attempts = dict(
            p.tiers.cp.run(
                lambda c: c.execute(
                    select(sagas.STEPS.c.step, sagas.STEPS.c.attempts).where(sagas.STEPS.c.saga_id == failure.saga_id)
                ).all(),
                operation="t",
                write=False,
            ).unwrap()
        )
        # (a delivery is counted under its part, ``write_ap.<region>.<shard>``; the chain stopped at the first)
        parts = {step: n for step, n in attempts.items() if step.startswith(f"{Step.WRITE_AP}.")}
        assert list(parts.values()) == [cap + 1], attempts
        blob_parts = [n for step, n in attempts.items() if step.startswith(f"{Step.STORE_BLOBS}.")]
        assert blob_parts == [1, 1], attempts  # the steps before it ran once each
        # the saga is compensated (not left running), every step it began undone,
        record = p.tiers.cp.run(lambda c: sagas.load(c, failure.saga_id), operation="t", write=False).unwrap()
        assert record is not None and record.status == SagaStatus.COMPENSATED and record.failed_step == Step.WRITE_AP
        assert set(record.steps.values()) == {StepState.COMPENSATED}, record.steps
        # every tier is clean once garbage collection has run, the stash is gone from the broker,
        assert tier_counts(p.tiers).rows["object_refs"] == 0
        counts = counts_after_gc(p.tiers)
        assert counts.stored() == 0 and counts.ap_rows == 0 and counts.blobs == 0, counts
        assert counts.rows["idempotency_keys"] == 0 and counts.rows["provenance_records"] == 0
        assert list(control.scan_iter("dm:saga-parts:*")) == []
        # and the worker survived its pool process's deaths: with the poison gone, the same requests commit.
        control.delete("dm:test:crash_always")
        assert main.poll() is None
        retried = (await p.ingest_many(batch_with_blobs(config))).unwrap()
        assert all(r.is_ok() for r in retried), retried[0]
        await eventually(lambda: assert_consistent(p.tiers))
    control.close()


async def test_a_late_duplicate_of_a_step_that_succeeded_neither_counts_nor_fails_the_saga(
    workers: Workers, celery_config: DataMeshConfig
) -> None:
    # Given a cap of one delivery per step, and AP workers but no cp worker yet (the pivot waits),
    workers.config = config = celery_config.with_changes(step_max_deliveries=1)
    workers.start("--role", "ap")
    workers.wait_ready()
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        executor = p._executor
        assert isinstance(executor, CeleryExecutor)
        plan, first = submit_capturing_first_message(p, real_requests(5))
        assert first["headers"]["task"] == "datamesh.write_ap" and not plan.blobs

        def load() -> sagas.SagaRecord:
            record = p.tiers.cp.run(lambda c: sagas.load(c, plan.saga_id), operation="t", write=False).unwrap()
            assert record is not None
            return record

        # and a saga whose AP writes all succeeded (each part delivered once),
        await eventually(lambda: _assert(load().steps.get(Step.WRITE_AP) == StepState.DONE), timeout=60)
        parts = {s: n for s, n in _attempts(p, plan.saga_id).items() if s.startswith("write_ap.")}
        assert parts and set(parts.values()) == {1}, parts
        # when its first step's message is delivered again while the pivot still waits (the message
        # carries the rest of the chain: every write_ap part runs a second time),
        publish_again(p, first)
        writes = len({(i.region, i.shard) for i in plan.items})
        await eventually(lambda: _equal(runs_per_node(executor.app, "datamesh.write_ap"), {"ap": 2 * writes}))
        # then the duplicates neither count a delivery nor trip the cap: the saga is still running,
        assert load().status == SagaStatus.RUNNING
        assert {s: n for s, n in _attempts(p, plan.saga_id).items() if s.startswith("write_ap.")} == parts
        # and once a cp worker runs, it commits: one conversation per request.
        workers.start("--role", "cp")
        committed = executor.wait(plan).unwrap()
        assert len(committed) == 5
        counts = tier_counts(p.tiers)
        assert counts.rows["conversations"] == 5 and counts.ap_rows == 5


def _assert(condition: bool) -> None:
    assert condition


def _equal(got: object, want: object) -> None:
    assert got == want, got


def _attempts(p: IngestionPipeline, saga_id: str) -> dict[str, int]:
    """Each step row's delivery count in the saga log."""
    steps = sagas.STEPS
    rows = p.tiers.cp.run(
        lambda c: c.execute(select(steps.c.step, steps.c.attempts).where(steps.c.saga_id == saga_id)).all(),
        operation="t",
        write=False,
    ).unwrap()
    return {row.step: int(row.attempts) for row in rows}


def submit_capturing_first_message(p: IngestionPipeline, requests: list[Any]) -> tuple[SagaPlan, dict[str, Any]]:
    """Reserve and submit a saga for ``requests`` (no blobs) under the Celery executor; its plan and
    its first message as it was published (body, exchange, routing key, headers)."""
    from celery.signals import before_task_publish

    from datamesh.pipeline.prepare import prepare
    from datamesh.pipeline.request import validate

    executor = p._executor
    assert isinstance(executor, CeleryExecutor)
    published: list[dict[str, Any]] = []

    def capture(body: Any, exchange: str, routing_key: str, headers: dict[str, Any], **kw: Any) -> None:
        published.append({"body": body, "exchange": exchange, "routing_key": routing_key, "headers": dict(headers)})

    prepared = [prepare(i, validate(r, max_payload_bytes=1 << 20).unwrap()) for i, r in enumerate(requests)]
    plan = executor.reserve("default", prepared).unwrap().plan
    content = {i: (r.prompt, r.response, None) for i, r in enumerate(requests)}
    before_task_publish.connect(capture, weak=False)
    try:
        executor.submit(plan, content, {}).unwrap()
    finally:
        before_task_publish.disconnect(capture)
    (first,) = published
    return plan, first


def publish_again(p: IngestionPipeline, message: dict[str, Any]) -> None:
    """Send the very same message again (same task id, same body), as a redelivery would."""
    executor = p._executor
    assert isinstance(executor, CeleryExecutor)
    with executor.app.producer_or_acquire() as producer:
        producer.publish(
            message["body"],
            exchange=message["exchange"],
            routing_key=message["routing_key"],
            headers=message["headers"],
            serializer="json",
        )
