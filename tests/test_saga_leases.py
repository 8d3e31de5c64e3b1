"""The saga's lease at each hand-off, in the saga log (SQLite and PostgreSQL).

Under the Celery executor a saga handed to a queue (created at ingest, a step or an undo recorded,
a step retried, a compensation enqueued) gets the queue timeout, ``DATAMESH_SAGA_QUEUE_TIMEOUT_S``;
a step that began gets the running lease, ``DATAMESH_SAGA_LEASE_S``.  In-process no saga waits in a
queue: every lease is the running one, as before.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from celery.exceptions import Retry

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import StorageError
from datamesh.core.result import Err
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline import compensation
from datamesh.pipeline.ingestion import IngestionRequest
from datamesh.pipeline.plan import SagaPlan
from datamesh.pipeline.prepare import prepare
from datamesh.pipeline.request import validate
from datamesh.pipeline.steps import Step, commit_cp, reserve, store_blobs, write_ap, write_ap_part
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sagas import SagaStatus
from datamesh.storage.cp.sql import utcnow
from datamesh.tasks import steps as step_tasks
from datamesh.tasks.compensation import queue_lease
from datamesh.workers.runtime import RUNTIME

LEASE_S = 3.0
QUEUE_S = 600.0
Content = dict[int, tuple[bytes, bytes, tuple[float, ...] | None]]


@pytest.fixture
def celery_tiers(config: DataMeshConfig) -> Iterator[Tiers]:
    """Tiers opened under the Celery executor, and the worker runtime (``RUNTIME``, as in a Celery
    worker) on the same configuration, for what the step tasks do around the step functions."""
    celery = config.with_changes(executor="celery", saga_lease_s=LEASE_S, saga_queue_timeout_s=QUEUE_S)
    tiers = Tiers.open(celery).unwrap()
    RUNTIME.configure(celery)
    try:
        yield tiers
    finally:
        RUNTIME.close()
        tiers.close()


def requests_with_a_blob(config: DataMeshConfig) -> list[IngestionRequest]:
    entity = EntityId.generate()
    big = b"L" * (config.inline_max_bytes + 1)
    return [
        IngestionRequest(entity_id=entity, prompt=b"small", response=b"inline", geo_region=GeoRegion.EU_WEST),
        IngestionRequest(entity_id=entity, prompt=b"large", response=big, geo_region=GeoRegion.EU_WEST),
    ]


def reserved(tiers: Tiers, requests: list[IngestionRequest]) -> tuple[SagaPlan, Content, dict[tuple[str, str], bytes]]:
    """``reserve`` a saga for ``requests``: its plan, its AP content and its blobs."""
    prepared = [prepare(i, validate(r, max_payload_bytes=1 << 20).unwrap()) for i, r in enumerate(requests)]
    plan = reserve(tiers, "default", prepared, shard_count=tiers.ap.shard_count).unwrap().plan
    content: Content = {i: (r.prompt, r.response, None) for i, r in enumerate(requests)}
    blobs = {(item.region, item.response_sha256): requests[item.index].response for item in plan.items}
    return plan, content, {key: data for key, data in blobs.items() if len(data) > tiers.inline_max_bytes}


def lease_of(tiers: Tiers, saga_id: str) -> float:
    """Seconds the saga's lease runs from its last update (every lease is set as ``now + lease_s``)."""
    record = tiers.cp.run(lambda c: sagas.load(c, saga_id), operation="t", write=False).unwrap()
    assert record is not None
    return (record.lease_expires_at - record.updated_at).total_seconds()


def reaped_after(tiers: Tiers, saga_id: str, seconds: float) -> bool:
    """Whether the reaper would take the saga ``seconds`` after its last update."""
    record = tiers.cp.run(lambda c: sagas.load(c, saga_id), operation="t", write=False).unwrap()
    assert record is not None
    now = record.updated_at + timedelta(seconds=seconds)
    return saga_id in tiers.cp.run(lambda c: sagas.expired(c, now=now), operation="t", write=False).unwrap()


def begin(saga_id: str, step: str) -> None:
    """What a step task does first, in a worker (counts the delivery, sets the running lease)."""
    assert step_tasks.begin(step_tasks.store_blobs_task, saga_id, step) == 1


def test_on_celery_a_saga_in_a_queue_gets_the_queue_timeout_and_a_running_step_the_lease(
    config: DataMeshConfig, celery_tiers: Tiers
) -> None:
    tiers = celery_tiers
    # Given a saga reserved by the caller under the Celery executor: it is handed to the blobs queue,
    plan, content, blobs = reserved(tiers, requests_with_a_blob(config))
    saga = plan.saga_id
    assert lease_of(tiers, saga) == QUEUE_S
    # when store_blobs begins in a worker it gets the running lease, which the reaper takes when it
    # runs out (a worker that died mid-step),
    begin(saga, Step.STORE_BLOBS)
    assert lease_of(tiers, saga) == LEASE_S and reaped_after(tiers, saga, LEASE_S + 1)
    # once recorded done the saga waits for write_ap in a queue, out of the reaper's reach until the
    # queue timeout,
    store_blobs(tiers, plan, blobs).unwrap()
    assert lease_of(tiers, saga) == QUEUE_S
    assert not reaped_after(tiers, saga, LEASE_S + 1) and reaped_after(tiers, saga, QUEUE_S + 1)
    # and so on for every step: write_ap running, then recorded done with the pivot queued,
    part = f"{Step.WRITE_AP}.eu-west.{plan.items[0].shard}"
    begin(saga, part)
    assert lease_of(tiers, saga) == LEASE_S
    write_ap_part(tiers, plan, content, part=part, marks=[Step.WRITE_AP]).unwrap()
    assert lease_of(tiers, saga) == QUEUE_S
    begin(saga, Step.COMMIT_CP)
    assert lease_of(tiers, saga) == LEASE_S
    # then the pivot commits it.
    assert len(commit_cp(tiers, plan).unwrap()) == 2


def test_on_celery_a_step_retried_waits_in_its_queue_under_the_queue_timeout(
    config: DataMeshConfig, celery_tiers: Tiers
) -> None:
    tiers = celery_tiers
    # Given a saga whose store_blobs began in a worker (the running lease),
    plan, _, _ = reserved(tiers, requests_with_a_blob(config))
    begin(plan.saga_id, Step.STORE_BLOBS)
    assert lease_of(tiers, plan.saga_id) == LEASE_S
    # when the step fails in a way worth retrying and its message goes back to the queue,
    failure = Err(StorageError("objects", "put", "throttled", retryable=True))
    with pytest.raises(Retry):
        step_tasks.finish(step_tasks.store_blobs_task, plan.saga_id, Step.STORE_BLOBS, failure, 1)
    # then the saga waits there under the queue timeout.
    assert lease_of(tiers, plan.saga_id) == QUEUE_S


def test_on_celery_a_compensation_in_a_queue_gets_the_queue_timeout(
    config: DataMeshConfig, celery_tiers: Tiers
) -> None:
    tiers = celery_tiers
    # Given a saga whose store_blobs failed after writing its blob,
    plan, _, blobs = reserved(tiers, requests_with_a_blob(config))
    saga = plan.saga_id
    begin(saga, Step.STORE_BLOBS)
    store_blobs(tiers, plan, blobs).unwrap()
    # when its compensation is claimed and enqueued (what enqueue_compensation and compensate do),
    assert compensation.claim(tiers, saga, failed_step=Step.STORE_BLOBS, error="boom").unwrap() == (
        SagaStatus.COMPENSATING
    )
    assert queue_lease(tiers, saga, SagaStatus.COMPENSATING).unwrap()
    # then it waits for its undo chain under the queue timeout, and so after each undo,
    assert lease_of(tiers, saga) == QUEUE_S
    for undo in (compensation.undo_write_ap, compensation.undo_store_blobs):
        undo(tiers, plan).unwrap()
        assert lease_of(tiers, saga) == QUEUE_S
    # until the last one closes it (the reaper never looks at a compensated saga again).
    compensation.undo_reserve(tiers, plan).unwrap()
    assert tiers.cp.run(lambda c: sagas.status_of(c, saga), operation="t").unwrap() == SagaStatus.COMPENSATED
    assert (
        saga not in tiers.cp.run(lambda c: sagas.expired(c, now=utcnow() + timedelta(days=1)), operation="t").unwrap()
    )


def test_in_process_every_lease_is_the_running_lease(config: DataMeshConfig) -> None:
    # Given the local executor's tiers (no queue between steps),
    local = config.with_changes(executor="local", saga_lease_s=LEASE_S, saga_queue_timeout_s=QUEUE_S)
    tiers = Tiers.open(local).unwrap()
    try:
        assert tiers.queue_lease_s == LEASE_S
        # when a saga is reserved and its steps run one after another,
        plan, content, blobs = reserved(tiers, requests_with_a_blob(config))
        leases = [lease_of(tiers, plan.saga_id)]
        store_blobs(tiers, plan, blobs).unwrap()
        leases.append(lease_of(tiers, plan.saga_id))
        write_ap(tiers, plan, content).unwrap()
        leases.append(lease_of(tiers, plan.saga_id))
        # then every lease it had was the running lease, as before the queue timeout existed.
        assert leases == [LEASE_S] * 3
    finally:
        tiers.close()


def test_a_worker_hands_sagas_to_queues_whatever_the_executor_setting(config: DataMeshConfig) -> None:
    # Given a worker process whose environment does not say DATAMESH_EXECUTOR=celery,
    RUNTIME.configure(config.with_changes(executor="local", saga_lease_s=LEASE_S, saga_queue_timeout_s=QUEUE_S))
    try:
        # when it opens its tiers, then what it hands to a queue gets the queue timeout all the same.
        assert (RUNTIME.tiers().lease_s, RUNTIME.tiers().queue_lease_s) == (LEASE_S, QUEUE_S)
    finally:
        RUNTIME.close()


def test_on_celery_a_saga_that_could_not_be_published_gets_the_running_lease(
    config: DataMeshConfig, celery_tiers: Tiers
) -> None:
    from datamesh.workers.executor import CeleryExecutor

    tiers = celery_tiers
    # Given a saga reserved under the Celery executor (the queue timeout) and a broker nobody listens on
    plan, content, blobs = reserved(tiers, requests_with_a_blob(config))
    assert lease_of(tiers, plan.saga_id) == QUEUE_S
    unreachable = config.with_changes(executor="celery", broker_url="redis://127.0.0.1:1/0")
    executor = CeleryExecutor(tiers, unreachable)
    # when its chain cannot be published, the caller gets a retryable error
    submitted = executor.submit(plan, content, blobs)
    assert isinstance(submitted, Err) and submitted.error.retryable and plan.saga_id in submitted.error.message
    # and, as nothing waits in a queue for it, the reaper takes it after the running lease, not the
    # queue timeout (its idempotency keys are held until then)
    assert lease_of(tiers, plan.saga_id) == LEASE_S and reaped_after(tiers, plan.saga_id, LEASE_S + 1)


def test_a_heartbeat_moves_a_running_lease_out_and_never_shortens_a_queue_timeout(
    config: DataMeshConfig, celery_tiers: Tiers
) -> None:
    tiers = celery_tiers
    # Given a saga whose step began in a worker (the running lease)
    plan, _, _ = reserved(tiers, requests_with_a_blob(config))
    begin(plan.saga_id, Step.STORE_BLOBS)
    before = tiers.cp.run(lambda c: sagas.load(c, plan.saga_id), operation="t", write=False).unwrap()
    assert before is not None
    # when the step's heartbeat beats a second later, the lease runs a full lease from the beat
    later = before.updated_at + timedelta(seconds=1)
    assert tiers.cp.run(
        lambda c: sagas.renew_lease(c, plan.saga_id, now=later, lease_s=LEASE_S), operation="t"
    ).unwrap()
    assert lease_of(tiers, plan.saga_id) == LEASE_S and not reaped_after(tiers, plan.saga_id, LEASE_S - 0.5)
    # and once the step handed the saga to a queue (the queue timeout), a late beat changes nothing
    queue_lease(tiers, plan.saga_id, SagaStatus.RUNNING).unwrap()
    assert not tiers.cp.run(
        lambda c: sagas.renew_lease(c, plan.saga_id, now=utcnow(), lease_s=LEASE_S), operation="t"
    ).unwrap()
    assert lease_of(tiers, plan.saga_id) == QUEUE_S
