"""The queue timeout on the Celery executor: a saga whose next message merely waits in a queue is not
reaped after the running lease (``DATAMESH_SAGA_LEASE_S``) but only after ``DATAMESH_SAGA_QUEUE_TIMEOUT_S``,
which still bounds how long a lost message leaves its saga in flight."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterable

import redis

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import SagaFailed
from datamesh.core.result import Err
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.pipeline.prepare import prepare
from datamesh.pipeline.request import validate
from datamesh.pipeline.steps import Step
from datamesh.pipeline.tiers import Tiers, readonly_engine_for
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sagas import SagaRecord, SagaStatus, StepState
from datamesh.storage.cp.sql import utcnow
from datamesh.workers import queues
from datamesh.workers.executor import CeleryExecutor
from tests.celery.conftest import Workers, caller, eventually, pool_children
from tests.celery.test_kills import settle
from tests.helpers import counts_after_gc, real_requests, tier_counts

BURST = 12


def records(tiers: Tiers, saga_ids: Iterable[str]) -> list[SagaRecord]:
    loaded = [tiers.cp.run(lambda c, s=s: sagas.load(c, s), operation="t", write=False).unwrap() for s in saga_ids]
    assert all(r is not None for r in loaded)
    return [r for r in loaded if r is not None]


async def outwait(tiers: Tiers, saga_ids: Iterable[str], seconds: float) -> None:
    """Sleep until every saga was last heard from more than ``seconds`` ago."""
    latest = max(r.updated_at for r in records(tiers, saga_ids))
    await asyncio.sleep(max(0.0, (latest - utcnow()).total_seconds() + seconds) + 0.5)


def waiting_messages(broker: redis.Redis, config: DataMeshConfig) -> dict[str, int]:
    """Messages waiting in each queue that has any (kombu keeps a Redis list per queue)."""
    depths = {name: int(broker.llen(name)) for name in queues.all_queues(config.ap_shards)}
    return {name: depth for name, depth in depths.items() if depth}


def with_blob(config: DataMeshConfig, n: int) -> IngestionRequest:
    big = b"%d" % n + b"B" * (config.inline_max_bytes + 1)
    return IngestionRequest(
        entity_id=EntityId.generate(), prompt=b"burst %d" % n, response=big, geo_region=GeoRegion.EU_WEST
    )


async def test_a_burst_waiting_in_queues_longer_than_the_lease_is_not_reaped_and_commits(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str
) -> None:
    config = workers.config = celery_config.with_changes(saga_lease_s=3.0, saga_queue_timeout_s=600.0)
    broker = redis.Redis.from_url(redis_url)
    async with (await IngestionPipeline.create(config)).unwrap() as p:  # its own reaper runs every 1.5 s
        executor = p._executor
        assert isinstance(executor, CeleryExecutor)
        # Given a burst of sagas (each stores a blob, writes AP, commits) enqueued while no worker runs,
        requests = [with_blob(config, n) for n in range(BURST)]
        pending = [(await p.ingest(r, wait=False)).unwrap() for r in requests]
        ids = [r.saga_id for r in pending]
        assert waiting_messages(broker, config) == {"blobs.eu-west": BURST}
        # when their first messages have waited longer than the lease and the reaper runs,
        await outwait(p.tiers, ids, config.saga_lease_s)
        # then it leaves them all alone;
        assert executor.reap() == []
        assert {r.status for r in records(p.tiers, ids)} == {SagaStatus.RUNNING}
        # when a blobs worker has run their first step and their write_ap messages wait as long,
        workers.start("--role", "blobs")
        workers.wait_ready()

        def blobs_stored() -> None:
            for r in records(p.tiers, ids):  # the step, and its one part (a region's blobs), recorded done
                assert r.steps.get(Step.STORE_BLOBS) == r.steps.get(f"{Step.STORE_BLOBS}.eu-west") == StepState.DONE

        await eventually(blobs_stored, timeout=60.0)
        assert sum(waiting_messages(broker, config).values()) == BURST
        await outwait(p.tiers, ids, config.saga_lease_s)
        # then the reaper leaves them alone again;
        assert executor.reap() == []
        assert {r.status for r in records(p.tiers, ids)} == {SagaStatus.RUNNING}
        # and once the AP and CP workers start, every saga commits and none was compensated.
        workers.start("--role", "all")
        workers.wait_ready(count=2)
        statuses = await settle(p.tiers)
        assert statuses == {SagaStatus.COMMITTED.value: BURST}, statuses
        assert all(r.failed_step is None and r.error is None for r in records(p.tiers, ids))
        assert {state for r in records(p.tiers, ids) for state in r.steps.values()} == {StepState.DONE}
        for request, response in zip(requests[::4], pending[::4], strict=True):
            stored = (await p.get(response.conversation_id)).unwrap()
            assert stored.turns[0].response == request.response
        await eventually(lambda: _all_stored(p.tiers))
    broker.close()


def _all_stored(tiers: Tiers) -> None:
    counts = tier_counts(tiers)
    assert (counts.rows["turns"], counts.ap_rows, counts.blobs) == (BURST, BURST, BURST), counts


async def test_a_saga_whose_message_is_lost_is_compensated_after_the_queue_timeout(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str
) -> None:
    config = workers.config = celery_config.with_changes(saga_lease_s=2.0, saga_queue_timeout_s=4.0)
    broker = redis.Redis.from_url(redis_url)
    with caller(config) as (tiers, executor):
        workers.start("--role", "blobs")
        workers.wait_ready()
        # Given a saga whose blob a worker stored, its write_ap message waiting in its shard's queue,
        entity, big = EntityId.generate(), b"L" * (config.inline_max_bytes + 1)
        requests = [
            IngestionRequest(entity_id=entity, prompt=b"large", response=big, geo_region=GeoRegion.EU_WEST),
            IngestionRequest(entity_id=entity, prompt=b"small", response=b"inline", geo_region=GeoRegion.EU_WEST),
        ]
        prepared = [prepare(i, validate(r, max_payload_bytes=1 << 20).unwrap()) for i, r in enumerate(requests)]
        plan = executor.reserve("default", prepared).unwrap().plan
        content = {i: (r.prompt, r.response, None) for i, r in enumerate(requests)}
        blobs = {(i.region, i.response_sha256): big for i in plan.items if i.response_location == "objects"}
        executor.submit(plan, content, blobs).unwrap()

        def blob_stored() -> None:
            (record,) = records(tiers, [plan.saga_id])
            assert record.steps.get(Step.STORE_BLOBS) == StepState.DONE

        await eventually(blob_stored, timeout=60.0)
        (record,) = records(tiers, [plan.saga_id])
        assert (record.lease_expires_at - record.updated_at).total_seconds() == config.saga_queue_timeout_s
        assert tier_counts(tiers).blobs == 1
        # when that message is lost (as with a broker restarted without persistence),
        waiting = waiting_messages(broker, config)
        assert list(waiting.values()) == [1] and next(iter(waiting)).startswith("ap.eu-west.")
        broker.delete(*waiting)
        # and the queue timeout has passed (a pool for every role is up to undo it),
        await outwait(tiers, [plan.saga_id], config.saga_queue_timeout_s)
        workers.start("--role", "all")
        workers.wait_ready(count=2)
        outcomes = executor.reap()
        # then the reaper compensates the saga: its caller hears it failed for its lease,
        assert [(o.saga_id, o.action) for o in outcomes] == [(plan.saga_id, SagaStatus.COMPENSATING.value)]
        failed = executor.wait(plan)
        assert isinstance(failed, Err) and isinstance(failed.error, SagaFailed), failed
        assert failed.error.step == "lease" and not failed.error.dead_lettered
        (record,) = records(tiers, [plan.saga_id])
        assert record.status == SagaStatus.COMPENSATED and set(record.steps.values()) == {StepState.COMPENSATED}
        # every tier is clean once garbage collection has run, and no stash is left in the broker.
        counts = counts_after_gc(tiers)
        assert counts.stored() == 0 and counts.ap_rows == 0 and counts.blobs == 0, counts
        assert counts.rows["object_refs"] == 0 and counts.rows["blobs"] == 0
        assert counts.rows["idempotency_keys"] == 0 and counts.rows["provenance_records"] == 0
        assert list(broker.scan_iter("dm:saga-parts:*")) == []
    broker.close()


def begun(tiers: Tiers, saga_id: str, step: Step) -> None:
    """Asserts that a part of ``step`` of the saga has begun in a worker and not finished."""
    (record,) = records(tiers, [saga_id])
    started = [name for name, state in record.steps.items() if state == StepState.RUNNING]
    assert any(name.startswith(step) for name in started), record.steps


async def test_a_live_step_slower_than_the_lease_keeps_its_saga_through_the_reaper(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str
) -> None:
    config = workers.config = celery_config.with_changes(saga_lease_s=3.0, saga_queue_timeout_s=600.0)
    control = redis.Redis.from_url(redis_url)
    # Given a worker whose store_blobs step runs three times as long as the running lease
    control.set("dm:test:stall", f"store_blobs:before={3 * config.saga_lease_s}")
    workers.start("--role", "all", hooks_redis=redis_url)
    workers.wait_ready()
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        executor = p._executor
        assert isinstance(executor, CeleryExecutor)
        pending = (await p.ingest(with_blob(config, 0), wait=False)).unwrap()

        await eventually(lambda: begun(p.tiers, pending.saga_id, Step.STORE_BLOBS), timeout=60.0)
        # when the reaper runs all through the step, well past the lease,
        reaped: list[object] = []
        for _ in range(int(2 * config.saga_lease_s)):
            reaped += executor.reap()
            await asyncio.sleep(1.0)
        # then it never takes the saga (the step's heartbeat renews the lease), and the saga commits
        assert reaped == []
        statuses = await settle(p.tiers)
        assert statuses == {SagaStatus.COMMITTED.value: 1}, (statuses, records(p.tiers, [pending.saga_id]))
    control.close()


async def test_beat_compensates_a_saga_whose_whole_worker_died_mid_step(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str
) -> None:
    config = workers.config = celery_config.with_changes(saga_lease_s=3.0)
    control = redis.Redis.from_url(redis_url)
    # Given a worker node stuck inside a saga's write_ap step (its message reserved, not acknowledged)
    control.set("dm:test:stall", "write_ap:before=120")
    first = workers.start("--role", "all", "--name", "doomed", hooks_redis=redis_url)
    workers.wait_ready()
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        request = real_requests(1)[0]
        pending = (await p.ingest(request, wait=False)).unwrap()

        await eventually(lambda: begun(p.tiers, pending.saga_id, Step.WRITE_AP), timeout=60.0)
    # (the pipeline is closed: its own reaper no longer runs, only beat's will)
    # when the whole node dies, main process and pool, and another node and beat start
    for pid in [*pool_children(first.pid), first.pid]:
        os.kill(pid, signal.SIGKILL)
    first.wait()
    control.delete("dm:test:stall")
    workers.start("--role", "all", "--name", "survivor")
    workers.start_beat()
    # then beat's reaper finds the saga once its lease ran out and has it compensated, long before
    # the broker would redeliver the dead node's message (the visibility timeout), and every tier is
    # clean
    tiers = Tiers.open(config, engine_factory=readonly_engine_for(config.ap_engine)).unwrap()
    try:

        def compensated() -> None:
            (record,) = records(tiers, [pending.saga_id])
            assert record.status == SagaStatus.COMPENSATED and record.failed_step == "lease", record

        await eventually(compensated, timeout=config.visibility_timeout_s / 2)
        counts = counts_after_gc(tiers)
        assert counts.stored() == 0 and counts.rows["idempotency_keys"] == 0, counts
    finally:
        tiers.close()
    control.close()


async def test_a_compensation_nobody_runs_is_redriven_a_bounded_number_of_times_then_dead_lettered(
    celery_config: DataMeshConfig, redis_url: str
) -> None:
    from datamesh.tasks.compensation import enqueue_compensation
    from tests.celery.conftest import run_cli

    limit = 2
    config = celery_config.with_changes(saga_lease_s=0.5, saga_queue_timeout_s=0.5, compensation_attempts=limit)
    broker = redis.Redis.from_url(redis_url)
    with caller(config) as (tiers, executor):
        # Given a saga claimed for compensation whose compensation never runs (no worker consumes
        # its queues: an outage of the pools, or its messages lost),
        prepared = [prepare(i, validate(r, max_payload_bytes=1 << 20).unwrap()) for i, r in enumerate(real_requests(2))]
        plan = executor.reserve("default", prepared).unwrap().plan
        assert enqueue_compensation(executor.app, tiers, plan.saga_id, failed_step="t", error="t").unwrap() == (
            SagaStatus.COMPENSATING
        )
        # when the reaper finds its lease expired, pass after pass,
        actions = []
        for _ in range(limit + 1):
            await outwait(tiers, [plan.saga_id], config.saga_queue_timeout_s)
            actions += [o.action for o in executor.reap() if o.saga_id == plan.saga_id]
        # then it enqueues the compensation again, each time counted, until the attempts are spent:
        # the saga is dead-lettered (listed by `sagas --dead`), not enqueued again for ever.
        assert actions == ["compensating"] * limit + ["dead"], actions
        (record,) = records(tiers, [plan.saga_id])
        assert record.status == SagaStatus.DEAD and "enqueued 3 times and never started" in (record.error or "")
        assert broker.llen(queues.CP_QUEUE) == 1 + limit  # the first compensate and the re-drives
        await outwait(tiers, [plan.saga_id], config.saga_queue_timeout_s)
        assert [o for o in executor.reap() if o.saga_id == plan.saga_id] == []
        assert plan.saga_id in run_cli(config, "sagas", "--dead")


def test_a_caller_that_stops_waiting_is_told_the_saga_is_in_flight_and_how_to_follow_it(
    celery_config: DataMeshConfig,
) -> None:
    from datamesh.core.errors import StorageError

    config = celery_config.with_changes(saga_wait_s=0.5, saga_queue_timeout_s=600.0, reap_interval_s=30.0)
    with caller(config) as (tiers, executor):
        # Given a reserved saga whose chain never reaches a worker (its message lost: none published)
        prepared = [prepare(i, validate(r, max_payload_bytes=1 << 20).unwrap()) for i, r in enumerate(real_requests(2))]
        plan = executor.reserve("default", prepared).unwrap().plan
        # When its caller's wait (DATAMESH_SAGA_WAIT_S) runs out
        waited = executor.wait(plan)
        # Then the answer is a retryable error, not a failure, naming the saga, when the reaper settles
        # it (queue timeout + one reap interval) and how to follow it
        assert isinstance(waited, Err) and isinstance(waited.error, StorageError) and waited.error.retryable
        message = waited.error.message
        assert f"saga {plan.saga_id} is still in flight after 0.5s" in message and "has not failed" in message
        assert "reaper will drive it forward or compensate it within 630s" in message
        assert f"saga_status('{plan.saga_id}')" in message and "idempotency keys" in message
        # and the saga is indeed still running, for the reaper to settle after its queue timeout
        (record,) = records(tiers, [plan.saga_id])
        assert record.status == SagaStatus.RUNNING and record.lease_expires_at > utcnow()


async def test_a_pivot_the_reaper_keeps_failing_is_dead_lettered_and_sagas_retry_commits_it(
    celery_config: DataMeshConfig,
) -> None:
    import dataclasses
    from datetime import timedelta

    from sqlalchemy import update

    from datamesh.core.retry import RetryPolicy
    from datamesh.pipeline.steps import store_blobs, write_ap
    from datamesh.storage.cp.database import CpDatabase
    from datamesh.tasks.reaper import reap_distributed
    from datamesh.workers.runtime import DONE_KEY
    from tests.celery.conftest import run_cli
    from tests.test_saga_faults import PIVOT_FAILURES, fail_pivots, heal_pivots

    config = celery_config.with_changes(reaper_pivot_attempts=2)
    tiers = Tiers.open(config).unwrap()  # a writer of the AP shards: it stands for the pools here
    executor = CeleryExecutor(tiers, config)
    broker = redis.Redis.from_url(config.broker_url)
    try:
        # Given a saga whose steps before the pivot are done and whose commit_cp message was lost,
        requests = real_requests(3)
        prepared = [prepare(i, validate(r, max_payload_bytes=1 << 20).unwrap()) for i, r in enumerate(requests)]
        plan = executor.reserve("default", prepared).unwrap().plan
        store_blobs(tiers, plan, {}).unwrap()
        write_ap(tiers, plan, {i: (r.prompt, r.response, None) for i, r in enumerate(requests)}).unwrap()
        expire = update(sagas.SAGAS).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        tiers.cp.run(lambda c: c.execute(expire), operation="t").unwrap()
        # and a PostgreSQL that fails its pivot with a serialization failure every time,
        fail_pivots(tiers, PIVOT_FAILURES["serialization-failure"])
        impatient = dataclasses.replace(
            tiers, cp=CpDatabase(tiers.cp.engine, policy=RetryPolicy(attempts=2, base_s=0.001, cap_s=0.001))
        )
        # when the Celery reaper runs twice (DATAMESH_REAPER_PIVOT_ATTEMPTS=2),
        passes = [reap_distributed(executor.app, impatient, broker, pivot_attempts=2) for _ in range(2)]
        # then the first pass leaves it running and the second dead-letters it, nothing undone,
        assert passes[0][0].action.startswith("error: commit_cp (reaper attempt 1 of 2)"), passes
        assert [(o.saga_id, o.action) for o in passes[1]] == [(plan.saga_id, SagaStatus.DEAD.value)]
        (record,) = records(tiers, [plan.saga_id])
        assert record.status == SagaStatus.DEAD and "pivot conflicted" in (record.error or "")
        assert tier_counts(tiers).ap_rows == 3
        # and its waiter is told (the outcome announced on the broker)
        assert broker.lrange(DONE_KEY.format(plan.saga_id), 0, -1) == [b"dead"]
        # Once PostgreSQL lets the pivot through, `sagas retry` commits it, exactly once
        heal_pivots(tiers)
        assert f"{plan.saga_id}: committed" in run_cli(config, "sagas", "retry", plan.saga_id)
        (record,) = records(tiers, [plan.saga_id])
        assert record.status == SagaStatus.COMMITTED
        counts = counts_after_gc(tiers)
        assert counts.rows["turns"] == 3 and counts.rows["conversations"] == 3 and counts.ap_rows == 3
        assert counts.rows["idempotency_keys"] == 3 and counts.blobs == 0
        assert broker.lrange(DONE_KEY.format(plan.saga_id), 0, 0) == [b"committed"]
        assert reap_distributed(executor.app, tiers, broker) == []
    finally:
        broker.close()
        executor.close()
        tiers.close()
