"""The index tier under Celery: real workers drain the index outbox; the caller searches read-only."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from datamesh.core.config import DataMeshConfig
from datamesh.core.principal import Principal, Role
from datamesh.core.types import ConversationId, GeoRegion
from datamesh.pipeline import indexer
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.workers import queues
from tests.celery.conftest import Workers
from tests.helpers import alpaca, real_requests

BOUND_S = 60.0


def principal(tenant: str) -> Principal:
    return Principal(tenant=tenant, name=f"{tenant}-user", roles=frozenset({Role.WRITER}))


def roomy(workers: Workers, config: DataMeshConfig) -> DataMeshConfig:
    """A saga lease that a busy 2-core box does not outrun (index drains share the worker process)."""
    workers.config = config.with_changes(saga_lease_s=20.0)
    return workers.config


def owed(p: IngestionPipeline) -> int:
    return sum(d.rows for d in indexer.outbox_status(p.tiers).unwrap().regions.values())


async def found(p: IngestionPipeline, words: str, who: Principal) -> set[ConversationId]:
    """The conversations ``who`` finds by ``words``, polling up to a bound for the index workers."""
    deadline = time.monotonic() + BOUND_S
    while True:
        hits = (await p.search(words, limit=50, principal=who)).unwrap()
        if hits or time.monotonic() > deadline:
            return {h.conversation_id for h in hits}
        await asyncio.sleep(0.2)


@pytest.mark.parametrize("celery_config", ["sqlite", "lsm"], indirect=True)
async def test_workers_index_committed_turns_and_other_processes_search_them(
    workers: Workers, celery_config: DataMeshConfig
) -> None:
    # Given a worker pool for every role (index included) and a Celery-mode pipeline,
    celery_config = roomy(workers, celery_config)
    workers.start("--role", "all")
    workers.wait_ready()
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        assert p._indexer is None and p.indexes.readonly  # no background indexer here; searches read-only
        # when two tenants ingest the same real AlpacaEval turns (in two regions),
        alice, bob = principal("alice"), principal("bob")
        mine = {r.unwrap().conversation_id for r in (await p.ingest_many(real_requests(12), principal=alice)).unwrap()}
        theirs = {
            r.unwrap().conversation_id
            for r in (await p.ingest_many(real_requests(12, region=GeoRegion.US_EAST), principal=bob)).unwrap()
        }
        # then, without any flush from here, words of each prompt find the turns (indexed by the workers),
        for row in alpaca()[:12]:
            words = " ".join(row["instruction"].split()[:6])
            for who, own in ((alice, mine), (bob, theirs)):
                hits = await found(p, words, who)
                assert hits and hits <= own, (who.tenant, words)
        # the outbox drains to nothing,
        deadline = time.monotonic() + BOUND_S
        while owed(p) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert owed(p) == 0
        # a third tenant finds nothing,
        assert (await p.search("the", limit=50, principal=principal("carol"))).unwrap() == []
        # and an erased conversation is no longer found; the workers remove it from the index too.
        words = " ".join(alpaca()[0]["instruction"].split()[:6])
        victim = next(iter(await found(p, words, alice)))
        (await p.erase_conversation(victim, principal=alice)).unwrap()
        assert victim not in {h.conversation_id for h in (await p.search(words, limit=50, principal=alice)).unwrap()}
        (await p.flush_index()).unwrap()  # under Celery: publishes drains and waits for an empty outbox
        assert owed(p) == 0
        index = p.indexes.region(GeoRegion.EU_WEST).unwrap()
        assert index.count().unwrap() == 11


async def test_beat_drains_the_outbox_when_the_drain_messages_are_lost(
    workers: Workers, celery_config: DataMeshConfig
) -> None:
    # Given workers for the saga but none for the index yet,
    celery_config = roomy(workers, celery_config)
    workers.start("--role", "cp")
    workers.start("--role", "blobs", "--region", "eu-west")
    workers.start("--role", "ap", "--region", "eu-west")
    workers.wait_ready(3)
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        requests = real_requests(5)
        committed = {r.unwrap().conversation_id for r in (await p.ingest_many(requests)).unwrap()}
        # when the drains commit_cp published are lost (the queue is purged),
        client = redis.Redis.from_url(celery_config.broker_url)
        client.delete(queues.index_queue("eu-west"))
        client.close()
        assert owed(p) >= 1
        # and an index worker with beat starts later,
        workers.start("--role", "index", "--region", "eu-west", "--beat")
        workers.wait_ready(4)
        # then beat's periodic drains index the turns: they are found and the outbox empties.
        words = " ".join(alpaca()[0]["instruction"].split()[:6])
        hits = await found(p, words, Principal.local_default(celery_config.tenant))
        assert hits and hits <= committed
        deadline = time.monotonic() + BOUND_S
        while owed(p) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        assert owed(p) == 0
