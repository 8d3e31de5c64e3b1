"""Compensation on the Celery executor: undone in reverse order of the steps, and idempotent (a crash
half-way and duplicated compensation messages leave every tier as one compensation does).

The workers' test hook (``tests/celery_hooks.py``) records each step and undo as it runs
(``dm:test:trace``) and crashes a worker at a chosen point (``dm:test:crash``).
"""

from __future__ import annotations

import asyncio
import functools
from pathlib import Path

import redis
from prometheus_client import REGISTRY

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import SagaFailed
from datamesh.observability import ledger
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.pipeline.plan import SagaPlan
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sagas import SagaStatus, StepState
from datamesh.tasks.codec import compensation_chain
from datamesh.workers import queues
from datamesh.workers.executor import CeleryExecutor
from tests.celery.conftest import Workers, run_cli
from tests.celery.test_faults import _ledger
from tests.helpers import TierCounts, counts_after_gc, tier_counts
from tests.test_saga_faults import batch_with_blobs


def trace_of(control: redis.Redis) -> list[str]:
    return [entry.decode() for entry in control.lrange("dm:test:trace", 0, -1)]


def plan_of(tiers: Tiers, saga_id: str) -> SagaPlan:
    record = tiers.cp.run(lambda c: sagas.load(c, saga_id), operation="t", write=False).unwrap()
    assert record is not None
    return SagaPlan.from_json(record.plan_json)


def ran(step: str, times: int) -> list[str]:
    """The trace of ``step`` run ``times`` times, each to its end."""
    return [f"{step}:before", f"{step}:after"] * times


def assert_compensated_once(tiers: Tiers, saga_id: str) -> TierCounts:
    """The saga is compensated and every tier holds nothing of it once garbage collection has run."""
    record = tiers.cp.run(lambda c: sagas.load(c, saga_id), operation="t", write=False).unwrap()
    assert record is not None and record.status == SagaStatus.COMPENSATED
    assert set(record.steps.values()) == {StepState.COMPENSATED}
    counts = counts_after_gc(tiers)
    assert counts.stored() == 0 and counts.ap_rows == 0 and counts.blobs == 0, counts
    assert counts.rows["object_refs"] == 0 and counts.rows["blobs"] == 0
    assert counts.rows["idempotency_keys"] == 0 and counts.rows["provenance_records"] == 0
    assert counts.rows["sagas"] == 1
    return counts


async def test_the_workers_undo_the_steps_in_reverse_order(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str
) -> None:
    control = redis.Redis.from_url(redis_url)
    control.set("dm:test:record", "1")
    workers.start("--role", "all", hooks_redis=redis_url)
    workers.wait_ready()
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        # Given a saga in two regions with blobs whose every step before the pivot ran, the pivot failing,
        control.set("dm:test:fault", "commit_cp:before")
        # when it is ingested and compensated by the workers,
        results = (await p.ingest_many(batch_with_blobs(celery_config))).unwrap()
        failure = results[0].error
        assert isinstance(failure, SagaFailed) and failure.step == "commit_cp", failure
        plan = plan_of(p.tiers, failure.saga_id)
        regions = len({b.region for b in plan.blobs})
        shards = len({(i.region, i.shard) for i in plan.items})
        assert regions == 2 and shards >= 2
        # then the undos ran after the steps, in reverse order: every shard's content, each region's
        # blob references, the reservation (made by the caller, undone last),
        forward = [*ran("store_blobs", regions), *ran("write_ap", shards), "commit_cp:before"]
        undo = [*ran("undo_write_ap", shards), *ran("undo_store_blobs", regions), *ran("undo_reserve", 1)]
        assert trace_of(control) == forward + undo
        # and nothing of the saga is left.
        assert_compensated_once(p.tiers, failure.saga_id)
    control.close()


async def test_a_compensation_crashed_half_way_and_delivered_again_leaves_the_tiers_as_once(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str, tmp_path: Path
) -> None:
    control = redis.Redis.from_url(redis_url)
    control.set("dm:test:record", "1")
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    before = ledger.snapshot(REGISTRY)
    workers.start("--role", "all", hooks_redis=redis_url, PROMETHEUS_MULTIPROC_DIR=str(multiproc))
    workers.wait_ready()
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        executor = p._executor
        assert isinstance(executor, CeleryExecutor)
        # Given a saga failing at its pivot, and a worker that crashes right after the first region's
        # blob references were dropped (undone in the CP tier, its message not yet acknowledged),
        control.set("dm:test:fault", "commit_cp:before")
        control.set("dm:test:crash", "undo_store_blobs:after")
        requests = batch_with_blobs(celery_config)
        # when it is ingested and compensated,
        results = (await p.ingest_many(requests)).unwrap()
        failure = results[0].error
        assert isinstance(failure, SagaFailed) and failure.step == "commit_cp" and not failure.dead_lettered
        # then the crash happened and the crashed undo ran again (the message was delivered again),
        assert not control.exists("dm:test:crash")
        undos = [entry for entry in trace_of(control) if entry.startswith("undo_")]
        regions = len({b.region for b in plan_of(p.tiers, failure.saga_id).blobs})
        assert undos.count("undo_store_blobs:before") == regions + 1, undos
        assert undos[-2:] == ran("undo_reserve", 1)
        # every tier holds what one compensation leaves, and the ledger counts its turns compensated once.
        once = assert_compensated_once(p.tiers, failure.saga_id)
        counted = _ledger(before, multiproc)
        assert (counted.compensated, counted.dead_letter, counted.in_flight) == (len(requests), 0, 0), counted

        # Given that compensated saga, when its compensation is delivered again, twice, and its whole
        # undo chain once more (duplicated or late messages),
        runs_before, logged = task_runs(executor), len(workers.logs())
        app, saga_id = executor.app, failure.saga_id
        for _ in range(2):
            app.signature(queues.COMPENSATE, kwargs={"saga_id": saga_id}).apply_async()
        compensation_chain(app, plan_of(p.tiers, saga_id)).apply_async()
        await runs_reach(executor, runs_before, {queues.COMPENSATE: 2, queues.UNDO_WRITE_AP: 1})
        # then they run without error and change nothing: every tier and the ledger are as after one.
        assert "raised unexpected" not in workers.logs()[logged:]
        assert tier_counts(p.tiers) == once
        assert_compensated_once(p.tiers, saga_id)
        again = _ledger(before, multiproc)
        assert (again.compensated, again.dead_letter, again.in_flight) == (len(requests), 0, 0), again
    control.close()


def task_runs(executor: CeleryExecutor) -> dict[str, int]:
    """How many times the workers ran each task (their own counts)."""
    stats = executor.app.control.inspect(timeout=1.0).stats() or {}
    runs: dict[str, int] = {}
    for worker in stats.values():
        for name, total in worker.get("total", {}).items():
            runs[name] = runs.get(name, 0) + int(total)
    return runs


async def runs_reach(executor: CeleryExecutor, before: dict[str, int], more: dict[str, int]) -> None:
    """Wait until the workers ran each task of ``more`` that many more times than ``before``."""
    for _ in range(100):
        runs = task_runs(executor)
        if all(runs.get(name, 0) >= before.get(name, 0) + n for name, n in more.items()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"tasks not run: {runs} (before {before}, expected {more} more)")


async def test_an_undo_that_kills_its_worker_on_every_delivery_is_dead_lettered_then_redriven(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str
) -> None:

    control = redis.Redis.from_url(redis_url)
    control.set("dm:test:record", "1")
    # Given a saga failing at its pivot, whose first undo kills its worker on every delivery (the
    # message is redelivered each time: acks late, rejected on a lost worker), three attempts allowed,
    limit = 3
    workers.config = config = celery_config.with_changes(compensation_attempts=limit)
    control.set("dm:test:fault", "commit_cp:before")
    control.set("dm:test:crash_always", "undo_write_ap:before")
    workers.start("--role", "all", hooks_redis=redis_url)
    workers.wait_ready()
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        requests = batch_with_blobs(config)
        # when it is ingested,
        results = (await p.ingest_many(requests)).unwrap()
        # then the caller hears that the saga failed and was dead-lettered (not left compensating),
        failure = results[0].error
        assert isinstance(failure, SagaFailed) and failure.step == "commit_cp" and failure.dead_lettered, failure
        record = p.tiers.cp.run(lambda c: sagas.load(c, failure.saga_id), operation="t", write=False).unwrap()
        assert record is not None and record.status == SagaStatus.DEAD, record
        assert record.error is not None and "undo_write_ap did not finish in 3 attempts" in record.error, record.error
        # after exactly the allowed deliveries of that undo, each one crashing its worker (the next
        # delivery found the attempts spent and ran nothing),
        undos = [entry for entry in trace_of(control) if entry.startswith("undo_")]
        assert undos == ["undo_write_ap:before"] * limit, undos
        assert record.attempts == limit + 1
        cli = functools.partial(run_cli, config)
        # and `sagas --dead` lists it.
        assert failure.saga_id in cli("sagas", "--dead")
        # Once the crash is fixed, `sagas retry ID` re-drives it to compensated, and every tier is clean.
        control.delete("dm:test:crash_always")
        assert "compensation enqueued" in cli("sagas", "retry", failure.saga_id)
        for _ in range(200):
            if (await p.saga_status(failure.saga_id)).unwrap() == SagaStatus.COMPENSATED:
                break
            await asyncio.sleep(0.1)
        assert_compensated_once(p.tiers, failure.saga_id)
        undone = p.tiers.cp.run(lambda c: sagas.load(c, failure.saga_id), operation="t", write=False).unwrap()
        assert undone is not None and undone.attempts == 0, undone
    control.close()


async def test_an_undo_that_keeps_hitting_the_time_limit_is_dead_lettered(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str
) -> None:
    control = redis.Redis.from_url(redis_url)
    control.set("dm:test:record", "1")
    # Given a saga failing at its pivot, whose first undo hangs past the task time limit every time
    # (the worker kills it; no errback, the compensation chain stops there), two attempts allowed,
    limit = 2
    workers.config = config = celery_config.with_changes(
        compensation_attempts=limit, step_time_limit_s=3.0, saga_queue_timeout_s=4.0
    )
    control.set("dm:test:fault", "commit_cp:before")
    control.set("dm:test:stall", "undo_write_ap:before=60")
    workers.start("--role", "all", hooks_redis=redis_url)
    workers.wait_ready()
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        # when it is ingested,
        results = (await p.ingest_many(batch_with_blobs(config))).unwrap()
        # then the reaper re-drives the stopped compensation until its attempts are spent, and the
        # caller hears that the saga was dead-lettered (not left compensating),
        failure = results[0].error
        assert isinstance(failure, SagaFailed) and failure.dead_lettered, failure
        record = p.tiers.cp.run(lambda c: sagas.load(c, failure.saga_id), operation="t", write=False).unwrap()
        assert record is not None and record.status == SagaStatus.DEAD, record
        assert record.error is not None and "undo_write_ap did not finish in 2 attempts" in record.error, record.error
        undos = [entry for entry in trace_of(control) if entry.startswith("undo_")]
        assert undos == ["undo_write_ap:before"] * limit, undos
    control.close()
