"""Workers SIGKILLed in the middle of steps: every saga ends committed exactly once or fully compensated.

Most kills take one pool child of the worker node (its Celery main process sees the child die and
puts the message back at once); some take the whole node, main process and pool, so that its
messages stay unacknowledged in the broker until the visibility timeout and only the saga reaper can
settle their sagas.
"""

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
from datamesh.workers.app import create_app
from tests.celery.conftest import Workers, eventually, pool_children
from tests.helpers import counts_after_gc, real_requests

KILLS = 20
NODE_KILLS = KILLS // 4  # of the KILLS, how many take the whole worker node (the others one pool child)
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
    """A worker SIGKILLed 20 times at random moments, mostly one pool child, a quarter of the time the
    whole node (then a fresh node starts): once the reaper is done every saga is committed or compensated."""
    control = redis.Redis.from_url(redis_url)
    control.set("dm:test:delay", "0.25")  # each step sleeps up to 0.25 s before and after: kills land inside
    main = workers.start("--role", "all", hooks_redis=redis_url)
    workers.start_beat()
    workers.wait_ready()
    rng = random.Random(7)
    node_kills = set(rng.sample(range(1, KILLS), NODE_KILLS))  # which kills take the whole node
    app = create_app(celery_config, load_celeryconfig=False)
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
        clients_done = asyncio.Event()
        in_flight_at_node_kills: list[list[str]] = []  # the sagas running when each node was killed
        unacked_at_node_kills: list[int] = []  # the messages the node had taken and not acknowledged

        async def client() -> None:
            while not queue.empty():
                batch = queue.get_nowait()
                results = (await p.ingest_many(batch)).unwrap()
                outcomes.extend(zip(batch, results, strict=True))

        def running_sagas() -> list[str]:
            return p.tiers.cp.run(
                lambda c: list(
                    c.execute(
                        select(sagas.SAGAS.c.id).where(sagas.SAGAS.c.status == SagaStatus.RUNNING.value)
                    ).scalars()
                ),
                operation="t",
                write=False,
            ).unwrap()

        def has_run_a_task(pid: int) -> bool:
            stats = app.control.inspect(timeout=0.5).stats() or {}
            return any(f".{pid}.0@" in node and s.get("total") for node, s in stats.items())

        async def pool_has_worked(pid: int, timeout: float = 30.0) -> None:
            # A child killed while the pool starts makes Celery give up on the whole worker ("Could
            # not start worker processes"), a startup failure, not the mid-step kill this test is
            # about: the next pool-child kill waits until the node has run a task (or no client is left).
            deadline = time.monotonic() + timeout
            while not clients_done.is_set() and not await asyncio.to_thread(has_run_a_task, pid):
                assert time.monotonic() < deadline, f"worker node {pid} ran no task in {timeout}s"
                await asyncio.sleep(0.2)

        async def killer() -> int:
            nonlocal main
            while not outcomes:  # not before the pool has run a saga (see pool_has_worked)
                await asyncio.sleep(0.05)
            kills = 0
            while kills < KILLS:
                await asyncio.sleep(rng.uniform(0.15, 0.6))
                if kills in node_kills:
                    # The whole node: its unacknowledged messages wait out the visibility timeout,
                    # the reaper has to settle their sagas; a fresh node takes over the queues.
                    in_flight_at_node_kills.append(await asyncio.to_thread(running_sagas))
                    unacked_at_node_kills.append(control.hlen("unacked"))  # Kombu's Redis transport's
                    workers.kill_node(main)
                    kills += 1
                    main = workers.start("--role", "all", hooks_redis=redis_url)
                    await asyncio.to_thread(workers.wait_ready)
                    await pool_has_worked(main.pid)
                    continue
                children = pool_children(main.pid)
                if children:
                    os.kill(rng.choice(children), signal.SIGKILL)
                    kills += 1
            return kills

        async def clients() -> None:
            await asyncio.gather(*(client() for _ in range(3)))
            clients_done.set()

        # Given ingests running in three clients while the worker is SIGKILLed 20 times, mostly its
        # pool process, five times the whole node (main process and pool, then a fresh node starts),
        kill_task = asyncio.create_task(killer())
        await clients()
        assert await kill_task == KILLS
        control.delete("dm:test:delay")
        # when the reaper has handled whatever the kills left behind,
        statuses = await settle(p.tiers)
        # then kills did land inside steps (steps were delivered again after their worker died),
        redelivered = p.tiers.cp.run(
            lambda c: c.execute(
                select(func.count())
                .select_from(sagas.STEPS)
                .where(sagas.STEPS.c.attempts > 1, sagas.STEPS.c.step != sagas.REDRIVES_STEP)
            ).scalar_one(),
            operation="t",
            write=False,
        ).unwrap()
        assert redelivered > 0, "no kill landed inside a step"
        # a whole-node kill did catch sagas in flight (theirs only the reaper could settle),
        assert len(in_flight_at_node_kills) == NODE_KILLS
        assert any(in_flight_at_node_kills), f"no node kill caught a saga in flight: {in_flight_at_node_kills}"
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
        caught = sorted({sid for ids_ in in_flight_at_node_kills for sid in ids_})
        ended = p.tiers.cp.run(
            lambda c: dict(
                c.execute(
                    select(sagas.SAGAS.c.status, func.count())
                    .where(sagas.SAGAS.c.id.in_(caught))
                    .group_by(sagas.SAGAS.c.status)
                ).all()
            ),
            operation="t",
            write=False,
        ).unwrap()
        print(
            f"{len(ok)} of {len(outcomes)} turns committed; sagas {statuses}; running at the node kills "
            f"{[len(x) for x in in_flight_at_node_kills]} (unacknowledged messages {unacked_at_node_kills}), "
            f"ended {ended}"
        )
    control.close()
