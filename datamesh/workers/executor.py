"""The Celery executor: the pipeline's side of a distributed saga.

``reserve`` runs in the caller, as under the local executor: it is one CP transaction whose outcome
(new work, a replay, a key in flight, a conflict) is the caller's answer, and it writes the saga row
before any message exists, so every message refers to a saga in the log.  ``submit`` publishes the
chain of step tasks with ``link_error``; ``wait`` blocks until the saga log says committed, compensated
or dead.  A Redis list per saga wakes the waiter early; the saga log in the CP tier is what it reads.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import redis
from celery import Celery

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import SagaFailed, StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import GeoRegion
from datamesh.pipeline.plan import SagaPlan
from datamesh.pipeline.prepare import Prepared
from datamesh.pipeline.saga import Content, FaultHook, ReapOutcome, _committed_by_other, _no_faults
from datamesh.pipeline.steps import Committed, ReserveOutcome, Step, reserve
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sagas import FINAL_STATUSES, SagaStatus
from datamesh.storage.cp.sql import utcnow
from datamesh.workers import queues
from datamesh.workers.runtime import DONE_KEY

_POLL_S = 1.0


def still_in_flight(saga_id: str, config: DataMeshConfig) -> StorageError:
    """The caller stopped waiting (``DATAMESH_SAGA_WAIT_S``) for a saga that has not settled: a
    retryable error that says so, not a failure.

    The wait is deliberately shorter than the queue timeout plus a reap interval, the longest a saga
    whose message was lost waits for the reaper: an HTTP caller cannot hold a request that long (the
    gateway's balancer reads for 60 s), and a shorter queue timeout would compensate sagas that merely
    wait in a long queue.  So the answer names the saga and what settles it, and how to follow it.
    """
    settle_s = config.saga_queue_timeout_s + config.reap_interval_s
    return StorageError(
        "pipeline",
        "ingest",
        f"saga {saga_id} is still in flight after {config.saga_wait_s:g}s (DATAMESH_SAGA_WAIT_S); it has not"
        f" failed: its steps are queued, or a message of it was lost and the reaper will drive it forward"
        f" or compensate it within {settle_s:g}s of its last progress (DATAMESH_SAGA_QUEUE_TIMEOUT_S +"
        f" DATAMESH_REAP_INTERVAL_S); follow it with saga_status({saga_id!r}), or send the same requests"
        " again with their idempotency keys for their first result",
        retryable=True,
    )


class CeleryExecutor:
    """Publishes sagas to the Celery workers and waits for their outcome in the saga log."""

    def __init__(
        self, tiers: Tiers, config: DataMeshConfig, app: Celery | None = None, *, faults: FaultHook = _no_faults
    ) -> None:
        from datamesh.workers.app import create_app

        self.faults = faults  # reserve runs here; the other steps' faults are injected in the workers
        self.tiers = tiers
        self.config = config
        self.app = app if app is not None else create_app(config, load_celeryconfig=False)
        self._redis = redis.Redis.from_url(config.broker_url, socket_timeout=_POLL_S + 5)

    def reserve(self, tenant: str, prepared: Sequence[Prepared]) -> Result[ReserveOutcome, StorageError | SagaFailed]:
        try:
            self.faults(Step.RESERVE, "before")
        except Exception as exc:  # noqa: BLE001 - nothing written yet
            return Err(SagaFailed("-", Step.RESERVE, f"{type(exc).__name__}: {exc}"))
        outcome = reserve(self.tiers, tenant, prepared, shard_count=self.config.ap_shards)
        if isinstance(outcome, Err) or not outcome.value.plan.items:
            return outcome
        try:
            self.faults(Step.RESERVE, "after")
        except Exception as exc:  # noqa: BLE001 - a failure after reserve is compensated like any step's
            from datamesh.tasks.compensation import enqueue_compensation

            plan = outcome.value.plan
            error = f"{type(exc).__name__}: {exc}"
            enqueue_compensation(self.app, self.tiers, plan.saga_id, failed_step=Step.RESERVE, error=error)
            waited = self.wait(plan)
            return Err(waited.error if isinstance(waited, Err) else SagaFailed(plan.saga_id, Step.RESERVE, error))
        return outcome

    def submit(
        self, plan: SagaPlan, content: Content, blobs: Mapping[tuple[str, str], bytes]
    ) -> Result[None, StorageError]:
        """Stash the saga's content and publish its chain; an unpublished saga is left to the reaper,
        with the short running lease rather than the queue timeout it was reserved with (nothing
        waits in a queue for it, and its idempotency keys stay held until it is reaped)."""
        from datamesh.tasks.codec import STASH_TTL_S, saga_chain, stash_key

        try:
            steps, stash = saga_chain(self.app, plan, content, blobs)
            if stash:
                pipe = self._redis.pipeline(transaction=False)
                pipe.hset(stash_key(plan.saga_id), mapping=stash)  # type: ignore[arg-type]
                pipe.expire(stash_key(plan.saga_id), STASH_TTL_S)
                pipe.execute()
            steps.apply_async(link_error=self.app.signature(queues.STEP_FAILED))
        except Exception as exc:  # noqa: BLE001 - kombu/redis failures after their retries: one boundary
            self.tiers.cp.run(
                lambda c: sagas.relet(c, plan.saga_id, SagaStatus.RUNNING, now=utcnow(), lease_s=self.tiers.lease_s),
                operation="saga.unpublished",
            )
            return Err(
                StorageError(
                    "broker", "submit", f"could not enqueue saga {plan.saga_id}: {exc}", retryable=True, cause=repr(exc)
                )
            )
        return Ok(None)

    def execute(
        self, plan: SagaPlan, content: Content, blobs: Mapping[tuple[str, str], bytes]
    ) -> Result[list[Committed], SagaFailed | StorageError]:
        submitted = self.submit(plan, content, blobs)
        if isinstance(submitted, Err):
            return submitted
        return self.wait(plan)

    def wait(self, plan: SagaPlan) -> Result[list[Committed], SagaFailed | StorageError]:
        deadline = time.monotonic() + self.config.saga_wait_s
        key = DONE_KEY.format(plan.saga_id)
        while True:
            found = self.tiers.cp.run(lambda c: sagas.outcome_of(c, plan.saga_id), operation="saga.wait", write=False)
            if isinstance(found, Ok) and found.value is not None and found.value[0] in FINAL_STATUSES:
                status, failed_step, error = found.value
                if status == SagaStatus.COMMITTED:
                    return Ok(_committed_by_other(self.tiers, plan))
                return Err(
                    SagaFailed(
                        plan.saga_id,
                        failed_step or "-",
                        error or "compensated",
                        dead_lettered=status == SagaStatus.DEAD,
                    )
                )
            left = deadline - time.monotonic()
            if left <= 0:
                return Err(still_in_flight(plan.saga_id, self.config))
            try:
                self._redis.blpop([key], timeout=max(0.01, min(_POLL_S, left)))
            except redis.RedisError:
                time.sleep(min(_POLL_S, max(left, 0)))  # broker away: poll the saga log

    def enqueue_index_drains(self) -> Result[None, StorageError]:
        """Publish an ``index_drain`` for every region (to the index workers)."""
        from datamesh.tasks.index import enqueue_index_drains

        try:
            enqueue_index_drains(self.app, [r.value for r in GeoRegion])
        except Exception as exc:  # noqa: BLE001 - kombu/redis failures after their retries: one boundary
            return Err(StorageError("broker", "index", f"could not enqueue index drains: {exc}", retryable=True))
        return Ok(None)

    def status(self, saga_id: str) -> Result[SagaStatus | None, StorageError]:
        return self.tiers.cp.run(lambda c: sagas.status_of(c, saga_id), operation="saga.status", write=False)

    def reap(self) -> list[ReapOutcome]:
        from datamesh.tasks.reaper import reap_distributed

        return reap_distributed(self.app, self.tiers, self._redis, pivot_attempts=self.config.reaper_pivot_attempts)

    def close(self) -> None:
        self._redis.close()
