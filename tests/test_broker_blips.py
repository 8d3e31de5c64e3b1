"""Redis blips on the Celery executor's way: they delay a saga, they neither fail nor strand it.

The shard leases live in the broker's Redis (:mod:`datamesh.workers.leases`): failing a task there
would fire the chain's errback and compensate a saga that nothing was wrong with, so ``hold_shard``
retries the task instead.  A compensation that could not be published leaves its saga with the short
running lease, so the reaper enqueues it again soon, not after the queue timeout.  The Redis here is a
``redis-server`` of the test's own, killed and restarted (never the shared one).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import redis
from celery.exceptions import Retry
from sqlalchemy import update

from datamesh.core.config import DataMeshConfig
from datamesh.core.result import Err
from datamesh.pipeline.saga import ReapOutcome
from datamesh.pipeline.steps import Step, store_blobs, write_ap
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sagas import SagaStatus
from datamesh.storage.cp.sql import utcnow
from datamesh.tasks.codec import stash_key
from datamesh.tasks.compensation import enqueue_compensation, undo_write_ap_task
from datamesh.tasks.reaper import reap_distributed
from datamesh.tasks.steps import hold_shard, write_ap_task
from datamesh.workers import queues
from datamesh.workers.app import create_app
from datamesh.workers.runtime import RUNTIME
from tests.celery.test_broker_restart import OwnRedis
from tests.test_saga_leases import LEASE_S, QUEUE_S, begin, lease_of, reaped_after, requests_with_a_blob, reserved


@pytest.mark.parametrize("task", [write_ap_task, undo_write_ap_task], ids=["write_ap", "undo_write_ap"])
def test_a_redis_blip_while_holding_a_shard_retries_the_task_instead_of_failing_it(
    config: DataMeshConfig, own_redis: OwnRedis, task: Any
) -> None:
    # Given a worker runtime whose broker Redis holds the lease of a shard it writes
    RUNTIME.configure(config.with_changes(executor="celery", broker_url=own_redis.url))
    try:
        hold_shard(task, "eu-west", 0)
        token = RUNTIME.token("eu-west", 0)
        assert token is not None
        # When that Redis goes away and a task of the shard tries to hold it again
        own_redis.kill()
        # Then the task is retried (its message goes back to the queue; no delivery was counted,
        # since hold_shard runs before the step begins), not failed into a compensation
        with pytest.raises(Retry):
            hold_shard(task, "eu-west", 0)
        # And once Redis is back, the worker holds the shard again, with a token never lower
        own_redis.start()
        hold_shard(task, "eu-west", 0)
        again = RUNTIME.token("eu-west", 0)
        assert again is not None and again >= token
    finally:
        RUNTIME.close()


def test_a_compensation_that_could_not_be_published_leaves_its_saga_to_the_reaper_soon(
    config: DataMeshConfig, own_redis: OwnRedis
) -> None:
    celery = config.with_changes(
        executor="celery", broker_url=own_redis.url, saga_lease_s=LEASE_S, saga_queue_timeout_s=QUEUE_S
    )
    tiers = Tiers.open(celery).unwrap()
    app = create_app(celery, load_celeryconfig=False)
    try:
        # Given a saga whose store_blobs step began in a worker and failed, and a broker gone away
        plan, _, _ = reserved(tiers, requests_with_a_blob(config))
        begin(plan.saga_id, Step.STORE_BLOBS)
        own_redis.kill()
        # When the errback (or the reaper) claims it for compensation and cannot publish ``compensate``
        failed = enqueue_compensation(app, tiers, plan.saga_id, failed_step=Step.STORE_BLOBS, error="boom")
        # Then the caller hears a retryable broker error, and the saga keeps the short running lease:
        # no message waits for it, so the reaper takes it again soon, not after the queue timeout
        assert isinstance(failed, Err) and failed.error.tier == "broker" and failed.error.retryable, failed
        assert lease_of(tiers, plan.saga_id) == LEASE_S and reaped_after(tiers, plan.saga_id, LEASE_S + 1)
        # And when the broker is back and the reaper enqueues it again, ``compensate`` waits in the
        # cp queue and the saga waits for it under the queue timeout
        own_redis.start()
        again = enqueue_compensation(app, tiers, plan.saga_id, failed_step="lease", error="lease expired")
        assert again.unwrap() == SagaStatus.COMPENSATING
        broker = redis.Redis.from_url(own_redis.url)
        assert broker.llen(queues.CP_QUEUE) == 1
        broker.close()
        assert lease_of(tiers, plan.saga_id) == QUEUE_S and not reaped_after(tiers, plan.saga_id, LEASE_S + 1)
    finally:
        RUNTIME.close()
        tiers.close()


def test_a_broker_down_does_not_stop_the_reaper_committing_a_saga(config: DataMeshConfig, own_redis: OwnRedis) -> None:
    celery = config.with_changes(executor="celery", broker_url=own_redis.url, saga_lease_s=LEASE_S)
    tiers = Tiers.open(celery).unwrap()
    app = create_app(celery, load_celeryconfig=False)
    broker = redis.Redis.from_url(own_redis.url)
    try:
        # Given a saga stashed in the broker, run up to the pivot, whose lease expired
        plan, content, blobs = reserved(tiers, requests_with_a_blob(config))
        broker.hset(stash_key(plan.saga_id), "part", b"{}")
        store_blobs(tiers, plan, blobs).unwrap()
        write_ap(tiers, plan, content).unwrap()
        expired = utcnow() - timedelta(seconds=1)
        tiers.cp.run(lambda c: c.execute(update(sagas.SAGAS).values(lease_expires_at=expired)), operation="t").unwrap()
        # when the broker is down as the reaper commits it,
        own_redis.kill()
        # then the commit stands and is reported (dropping the stash is best effort: it expires)
        assert reap_distributed(app, tiers, broker) == [ReapOutcome(plan.saga_id, SagaStatus.COMMITTED.value)]
    finally:
        broker.close()
        RUNTIME.close()
        tiers.close()
