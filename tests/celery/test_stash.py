"""Saga content is stashed beside the messages, not carried in them: sizes, cleanup, a lost stash."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis

import datamesh.tasks.codec as codec
from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import SagaFailed
from datamesh.core.result import Err
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.pipeline.saga import ReapOutcome
from datamesh.pipeline.steps import Step
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sagas import SagaStatus, StepState
from datamesh.workers.runtime import DONE_KEY
from tests.celery.conftest import Workers, caller, eventually, run_cli
from tests.celery.test_queue_timeout import outwait, records
from tests.helpers import counts_after_gc, tier_counts
from tests.test_saga_faults import batch_with_blobs
from tests.test_saga_leases import requests_with_a_blob, reserved


async def test_messages_name_their_stashed_content_which_is_dropped_when_the_saga_commits(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given workers, and a caller that records the chain and stash of each saga it publishes
    broker = redis.Redis.from_url(redis_url)
    workers.start("--role", "all")
    workers.wait_ready()
    published: list[tuple[Any, dict[str, bytes]]] = []
    real_chain = codec.saga_chain

    def recording(*args: Any) -> Any:
        made = real_chain(*args)
        published.append(made)
        return made

    monkeypatch.setattr(codec, "saga_chain", recording)
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        # When a batch with inline and object-store payloads in two regions is ingested
        requests = batch_with_blobs(celery_config)
        results = (await p.ingest_many(requests)).unwrap()
        assert all(r.is_ok() for r in results), results[0]
        # Then its messages carry part names, not content: the whole chain is small next to the stash
        ((steps, stash),) = published
        messages = [sig.kwargs for sig in steps.tasks]
        assert all("content" not in m and "blobs" not in m for m in messages)
        assert {m["part"] for m in messages if "part" in m} == set(stash)
        assert any(part.startswith(f"{Step.STORE_BLOBS}.") for part in stash)
        assert any(part.startswith(f"{Step.WRITE_AP}.") for part in stash)
        assert len(json.dumps(messages)) < sum(map(len, stash.values())) / 2
        # And the committed saga's stash is gone from the broker
        saga_id = steps.tasks[0].kwargs["saga_id"]
        record = p.tiers.cp.run(lambda c: sagas.load(c, saga_id), operation="t").unwrap()
        assert record is not None and record.status == SagaStatus.COMMITTED
        assert broker.exists(codec.stash_key(saga_id)) == 0
        assert list(broker.scan_iter("dm:saga-parts:*")) == []
    broker.close()


async def test_a_step_whose_stashed_content_is_gone_fails_and_its_saga_is_compensated(
    workers: Workers, celery_config: DataMeshConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given workers, and a caller whose stash never reaches the broker (as if it expired or the
    # broker lost it)
    workers.start("--role", "all")
    workers.wait_ready()
    real_chain = codec.saga_chain
    monkeypatch.setattr(codec, "saga_chain", lambda *args: (real_chain(*args)[0], {}))
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        # When a batch is ingested
        results = (await p.ingest_many(batch_with_blobs(celery_config))).unwrap()
        # Then every item reports the failed saga with a clear reason, at its first step
        failure = results[0].error if isinstance(results[0], Err) else None
        assert isinstance(failure, SagaFailed) and failure.step == Step.STORE_BLOBS, results[0]
        assert "no longer in the broker" in failure.message, failure.message
        assert all(isinstance(r, Err) for r in results)
        # And every tier is clean but for the compensated saga's record
        assert tier_counts(p.tiers).rows["object_refs"] == 0
        counts = counts_after_gc(p.tiers)  # the blobs it wrote are garbage collection's to delete
        assert counts.stored() == 0 and counts.ap_rows == 0 and counts.blobs == 0
        assert counts.rows["idempotency_keys"] == 0 and counts.rows["object_refs"] == 0
        record = p.tiers.cp.run(lambda c: sagas.load(c, failure.saga_id), operation="t").unwrap()
        assert record is not None and record.status == SagaStatus.COMPENSATED


def reap_with_cli(config: DataMeshConfig) -> list[ReapOutcome]:
    """``python -m datamesh reap``, as an operator runs it, and the outcomes it prints."""
    return [ReapOutcome(*line.split(" ", 1)) for line in run_cli(config, "reap").splitlines()[:-1]]


@pytest.mark.parametrize("reaper", ["pipeline", "cli"])
async def test_a_saga_the_reaper_commits_has_its_stash_dropped(
    workers: Workers, celery_config: DataMeshConfig, redis_url: str, reaper: str
) -> None:
    config = workers.config = celery_config.with_changes(saga_lease_s=2.0, saga_queue_timeout_s=4.0)
    broker = redis.Redis.from_url(redis_url)
    with caller(config) as (tiers, executor):
        # Given workers for the blobs and AP steps but none for cp, and a saga they have run up to
        # the pivot: its commit_cp message waits in the cp queue, its stash still in the broker,
        workers.start("--role", "blobs")
        workers.start("--role", "ap")
        workers.wait_ready(count=2)
        plan, content, blobs = reserved(tiers, requests_with_a_blob(config))
        executor.submit(plan, content, blobs).unwrap()

        def written() -> None:
            (record,) = records(tiers, [plan.saga_id])
            assert record.steps.get(Step.WRITE_AP) == StepState.DONE, record.steps

        await eventually(written, timeout=60.0)
        assert broker.exists(codec.stash_key(plan.saga_id)) == 1
        # when the queue timeout has passed and the reaper (the pipeline's own, or an operator's
        # ``python -m datamesh reap``) drives the saga forward,
        await outwait(tiers, [plan.saga_id], config.saga_queue_timeout_s)
        outcomes = executor.reap() if reaper == "pipeline" else reap_with_cli(config)
        assert outcomes == [ReapOutcome(plan.saga_id, SagaStatus.COMMITTED.value)]
        # then the saga's stash is gone from the broker, and its waiter was woken as the commit_cp
        # task would have woken it
        assert broker.exists(codec.stash_key(plan.saga_id)) == 0
        assert broker.lrange(DONE_KEY.format(plan.saga_id), 0, -1) == [SagaStatus.COMMITTED.value.encode()]
        assert len(executor.wait(plan).unwrap()) == len(plan.items)
    broker.close()
