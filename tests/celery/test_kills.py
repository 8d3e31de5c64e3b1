"""Workers SIGKILLed in the middle of steps: every saga ends committed exactly once or fully compensated."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import pytest
import redis
from sqlalchemy import func, select

from datamesh.core.config import DataMeshConfig
from datamesh.core.types import EntityId, GeoRegion
from datamesh.models.tables import ObjectRef, Saga, Turn
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sagas import SagaStatus
from tests.celery.conftest import Workers, eventually, pool_children
from tests.helpers import counts_after_gc, real_requests

KILLS = 20
BATCHES = 36
BATCH = 12


async def settle(tiers: Tiers, timeout: float = 90.0) -> dict[str, int]:
    """Wait until no saga is running or compensating (the beat reaper finishes what the kills left)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = tiers.cp.run(sagas.count_by_status, operation="t", write=False).unwrap()
        if not counts.get(SagaStatus.RUNNING.value) and not counts.get(SagaStatus.COMPENSATING.value):
            return counts
        assert time.monotonic() < deadline, f"sagas still in flight: {counts}"
        await asyncio.sleep(0.5)


def assert_consistent(tiers: Tiers) -> None:
    """No orphan content, no orphan blob, no duplicate conversation."""

    def q(conn: object) -> dict[str, int]:
        c = conn  # type: ignore[assignment]
        return {
            "turns": c.execute(select(func.count()).select_from(Turn)).scalar_one(),  # type: ignore[attr-defined]
            "committed_refs": c.execute(  # type: ignore[attr-defined]
                select(func.count(func.distinct(ObjectRef.content_hash)))
                .select_from(ObjectRef)
                .join(Saga, Saga.id == ObjectRef.saga_id)
                .where(Saga.status == SagaStatus.COMMITTED.value)
            ).scalar_one(),
            "refs": c.execute(select(func.count()).select_from(ObjectRef)).scalar_one(),  # type: ignore[attr-defined]
            "distinct_digests": c.execute(  # type: ignore[attr-defined]
                select(func.count(func.distinct(Turn.prompt_sha256 + Turn.response_sha256)))
            ).scalar_one(),
        }

    facts = tiers.cp.run(q, operation="t", write=False).unwrap()
    counts = counts_after_gc(tiers)  # compensations leave unreferenced blobs to garbage collection
    assert counts.ap_rows == facts["turns"], (counts, facts)  # every AP row belongs to a committed turn
    assert counts.rows["conversations"] == facts["turns"]  # one new conversation per request
    assert facts["distinct_digests"] == facts["turns"]  # no request stored twice
    assert counts.blobs == facts["committed_refs"] == counts.rows["blobs"], (counts, facts)  # no orphan blob
    assert counts.rows["idempotency_keys"] == facts["turns"]  # compensated sagas released their keys


@pytest.mark.parametrize("celery_config", ["sqlite", "lsm"], indirect=True)
async def test_workers_killed_mid_step(workers: Workers, celery_config: DataMeshConfig, redis_url: str) -> None:
    control = redis.Redis.from_url(redis_url)
    control.set("dm:test:delay", "0.25")  # each step sleeps up to 0.25 s before and after: kills land inside
    main = workers.start("--role", "all", hooks_redis=redis_url)
    workers.start_beat()
    workers.wait_ready()
    rng = random.Random(7)
    pool = real_requests(BATCHES * BATCH, entities=16)
    batches = [pool[i * BATCH : (i + 1) * BATCH] for i in range(BATCHES)]
    for n, batch in enumerate(batches[::3]):  # a third of the batches store a blob too
        big = b"%d" % n + b"L" * (celery_config.inline_max_bytes + 1)
        batch.append(
            IngestionRequest(entity_id=EntityId.generate(), prompt=b"big", response=big, geo_region=GeoRegion.EU_WEST)
        )
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        queue: asyncio.Queue[list[IngestionRequest]] = asyncio.Queue()
        for batch in batches:
            queue.put_nowait(batch)
        outcomes: list[tuple[IngestionRequest, object]] = []

        async def client() -> None:
            while not queue.empty():
                batch = queue.get_nowait()
                results = (await p.ingest_many(batch)).unwrap()
                outcomes.extend(zip(batch, results, strict=True))

        async def killer() -> int:
            # Not before the pool has run a saga: a child killed while the pool starts makes Celery
            # give up on the whole worker ("Could not start worker processes"), a startup failure,
            # not the mid-step kill this test is about.
            while not outcomes:
                await asyncio.sleep(0.05)
            kills = 0
            while kills < KILLS:
                await asyncio.sleep(rng.uniform(0.15, 0.6))
                children = pool_children(main.pid)
                if children:
                    os.kill(rng.choice(children), signal.SIGKILL)
                    kills += 1
            return kills

        # Given ingests running in three clients while the worker's pool process is SIGKILLed 20 times,
        kill_task = asyncio.create_task(killer())
        await asyncio.gather(*(client() for _ in range(3)))
        assert await kill_task == KILLS
        control.delete("dm:test:delay")
        # when the reaper has handled whatever the kills left behind,
        statuses = await settle(p.tiers)
        # then kills did land inside steps (steps were delivered again after their worker died),
        redelivered = p.tiers.cp.run(
            lambda c: c.execute(
                select(func.count()).select_from(sagas.STEPS).where(sagas.STEPS.c.attempts > 1)
            ).scalar_one(),
            operation="t",
            write=False,
        ).unwrap()
        assert redelivered > 0, "no kill landed inside a step"
        # every saga is committed or compensated (none dead, none in flight),
        assert set(statuses) <= {SagaStatus.COMMITTED.value, SagaStatus.COMPENSATED.value}, statuses
        # every acknowledged turn reads back, and
        ok = [(req, r) for req, r in outcomes if r.is_ok()]  # type: ignore[attr-defined]
        assert ok, "no ingest succeeded"
        for req, r in ok[::7]:
            stored = (await p.get(r.unwrap().conversation_id)).unwrap()  # type: ignore[attr-defined]
            assert stored.turns[0].prompt == req.prompt and stored.turns[0].response == req.response
        ids = [r.unwrap().conversation_id for _, r in ok]  # type: ignore[attr-defined]
        assert len(ids) == len(set(ids))
        # no tier holds an orphan or a duplicate (once the LSM owners flushed what they wrote last).
        await eventually(lambda: assert_consistent(p.tiers))
        print(f"{len(ok)} of {len(outcomes)} turns committed; sagas {statuses}")
    control.close()
