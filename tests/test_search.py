"""Search through the pipeline: the outbox feeds the index after the CP commit; access inside the query."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import func, select

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import AccessDenied, ValidationError
from datamesh.core.principal import Principal, Role
from datamesh.core.result import Err
from datamesh.core.types import EntityId, GeoRegion
from datamesh.models.tables import IndexOutbox
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from tests.helpers import alpaca, real_requests


@pytest.fixture
async def pipeline(config: DataMeshConfig) -> AsyncIterator[IngestionPipeline]:
    created = await IngestionPipeline.create(config.with_changes(indexer=False))
    async with created.unwrap() as p:
        yield p


def outbox_rows(p: IngestionPipeline) -> int:
    return p.tiers.cp.run(
        lambda conn: int(conn.execute(select(func.count()).select_from(IndexOutbox)).scalar_one()),
        operation="test.outbox",
        write=False,
    ).unwrap()


def principal(tenant: str, *roles: Role, entities: frozenset[str] | None = None) -> Principal:
    return Principal(tenant=tenant, name=f"{tenant}-user", roles=frozenset(roles), entities=entities)


async def test_commit_writes_outbox_rows_and_flush_makes_turns_searchable(pipeline: IngestionPipeline) -> None:
    # Given real AlpacaEval turns ingested (the background indexer is off in this fixture)
    requests = real_requests(40)
    results = (await pipeline.ingest_many(requests)).unwrap()
    assert all(r.is_ok() for r in results)
    # then the commit left index work in the outbox, and nothing is searchable yet
    assert outbox_rows(pipeline) == 1
    assert (await pipeline.search("Python")).unwrap() == []
    # when the outbox is drained
    assert (await pipeline.flush_index()).unwrap() == 1
    assert outbox_rows(pipeline) == 0
    # then every known prompt is found by words from it, with its turn
    for request, result in list(zip(requests, results, strict=True))[:10]:
        words = " ".join(request.prompt.decode().split()[:8])
        hits = (await pipeline.search(words, limit=5)).unwrap()
        ids = [h.conversation_id for h in hits]
        assert result.unwrap().conversation_id in ids, words
        hit = hits[ids.index(result.unwrap().conversation_id)]
        assert hit.turn_seq == 0 and hit.turn_id == result.unwrap().turn_id and hit.score > float("-inf")
        assert hit.region is GeoRegion.EU_WEST and hit.entity_id == request.entity_id


async def test_background_indexer_feeds_the_index(config: DataMeshConfig) -> None:
    async with (await IngestionPipeline.create(config.with_changes(index_interval_s=0.05))).unwrap() as p:
        result = (await p.ingest(real_requests(1)[0])).unwrap()
        words = alpaca()[0]["instruction"]
        for _ in range(200):
            hits = (await p.search(words)).unwrap()
            if hits:
                break
            await asyncio.sleep(0.05)
        assert [h.conversation_id for h in hits] == [result.conversation_id]
        # the indexer settles the outbox row in a transaction of its own, after the hit is visible
        for _ in range(200):
            if outbox_rows(p) == 0:
                break
            await asyncio.sleep(0.05)
        assert outbox_rows(p) == 0


async def test_a_tenant_never_sees_another_tenants_hits(pipeline: IngestionPipeline) -> None:
    # Given the same prompts ingested by two tenants
    requests = real_requests(20)
    alice = principal("alice", Role.WRITER)
    bob = principal("bob", Role.WRITER)
    mine = {r.unwrap().conversation_id for r in (await pipeline.ingest_many(requests, principal=alice)).unwrap()}
    theirs = {r.unwrap().conversation_id for r in (await pipeline.ingest_many(requests, principal=bob)).unwrap()}
    (await pipeline.flush_index()).unwrap()
    # when each searches for words of every prompt, then each sees only its own conversations
    for row in alpaca()[:20]:
        words = " ".join(row["instruction"].split()[:6])
        for who, own in ((alice, mine), (bob, theirs)):
            hits = (await pipeline.search(words, limit=50, principal=who)).unwrap()
            assert hits and {h.conversation_id for h in hits} <= own
    # and a third tenant sees nothing at all
    assert (await pipeline.search("the", limit=50, principal=principal("carol", Role.READER))).unwrap() == []


async def test_an_entity_narrowed_principal_sees_only_its_entities(pipeline: IngestionPipeline) -> None:
    requests = real_requests(24, entities=4)
    (await pipeline.ingest_many(requests)).unwrap()
    (await pipeline.flush_index()).unwrap()
    granted = str(requests[0].entity_id)
    narrow = principal(pipeline.config.tenant, Role.READER, entities=frozenset({granted}))
    hits = (await pipeline.search("the", limit=100, principal=narrow)).unwrap()
    assert hits and {str(h.entity_id) for h in hits} == {granted}
    # and an entity filter outside the grants finds nothing (not an error that leaks existence)
    other = str(requests[1].entity_id)
    assert (await pipeline.search("the", entity_id=other, principal=narrow)).unwrap() == []
    wide = (await pipeline.search("the", entity_id=other, limit=100)).unwrap()
    assert wide and {str(h.entity_id) for h in wide} == {other}
    nobody = principal(pipeline.config.tenant, Role.READER, entities=frozenset())
    assert (await pipeline.search("the", principal=nobody)).unwrap() == []


async def test_regions_are_separate(pipeline: IngestionPipeline) -> None:
    eu = real_requests(10, region=GeoRegion.EU_WEST)
    us = real_requests(10, region=GeoRegion.US_EAST)
    (await pipeline.ingest_many(eu + us)).unwrap()
    (await pipeline.flush_index()).unwrap()
    words = " ".join(alpaca()[3]["instruction"].split()[:6])
    in_eu = (await pipeline.search(words, region="eu-west")).unwrap()
    in_us = (await pipeline.search(words, region=GeoRegion.US_EAST)).unwrap()
    everywhere = (await pipeline.search(words, limit=20)).unwrap()
    assert in_eu and {h.region for h in in_eu} == {GeoRegion.EU_WEST}
    assert in_us and {h.region for h in in_us} == {GeoRegion.US_EAST}
    assert {h.region for h in everywhere} == {GeoRegion.EU_WEST, GeoRegion.US_EAST}
    # each region's index holds only that region's turns
    for region in (GeoRegion.EU_WEST, GeoRegion.US_EAST):
        assert pipeline.indexes.region(region).unwrap().count().unwrap() == 10
    assert (await pipeline.search(words, region="ap-southeast")).unwrap() == []


async def test_vector_search_finds_the_given_embedding(pipeline: IngestionPipeline) -> None:
    dim = pipeline.indexes.config.dim
    entity = EntityId.generate()
    vectors = [tuple(1.0 if j == i else 0.01 for j in range(dim)) for i in range(5)]
    sent = [
        IngestionRequest(
            entity_id=entity, prompt=f"p{i}".encode(), response=b"r", geo_region=GeoRegion.EU_WEST, embedding=v
        )
        for i, v in enumerate(vectors)
    ]
    done = [r.unwrap() for r in (await pipeline.ingest_many(sent)).unwrap()]
    (await pipeline.flush_index()).unwrap()
    hits = (await pipeline.search(vector=vectors[2], limit=1)).unwrap()
    assert [h.conversation_id for h in hits] == [done[2].conversation_id]


async def test_time_range_filters_inside_the_query(pipeline: IngestionPipeline) -> None:
    (await pipeline.ingest_many(real_requests(5))).unwrap()
    (await pipeline.flush_index()).unwrap()
    now = datetime.now(UTC)
    assert (await pipeline.search("the", since=now - timedelta(minutes=5))).unwrap()
    assert (await pipeline.search("the", since=now + timedelta(minutes=5))).unwrap() == []
    assert (await pipeline.search("the", until=now - timedelta(minutes=5))).unwrap() == []


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({}, "text"),
        ({"text": ""}, "text"),
        ({"text": "x", "limit": 0}, "limit"),
        ({"text": "x", "limit": 5000}, "limit"),
        ({"text": "x", "region": "mars"}, "region"),
        ({"text": "x", "entity_id": "nope"}, "entity_id"),
        ({"text": "x", "since": datetime(2026, 1, 1)}, "since"),
        ({"vector": [1.0, 2.0]}, "vector"),
        ({"vector": "abc"}, "vector"),
    ],
)
async def test_bad_arguments_are_validation_errors(
    pipeline: IngestionPipeline, kwargs: dict[str, object], field: str
) -> None:
    (await pipeline.ingest(real_requests(1)[0])).unwrap()
    (await pipeline.flush_index()).unwrap()
    found = await pipeline.search(**kwargs)  # type: ignore[arg-type]
    assert isinstance(found, Err) and isinstance(found.error, ValidationError) and found.error.field == field


async def test_search_needs_the_reader_role(pipeline: IngestionPipeline) -> None:
    nobody = Principal(tenant="default", name="x", roles=frozenset())
    found = await pipeline.search("x", principal=nobody)
    assert isinstance(found, Err) and isinstance(found.error, AccessDenied)


async def test_failed_index_work_is_retried_until_done(
    pipeline: IngestionPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datamesh.pipeline import indexer
    from datamesh.storage.index import RegionalIndexes

    (await pipeline.ingest(real_requests(1)[0])).unwrap()
    real_add = RegionalIndexes.add_many
    calls = {"n": 0}

    def flaky(self: RegionalIndexes, docs: object) -> object:
        calls["n"] += 1
        if calls["n"] == 1:
            from datamesh.core.errors import StorageError
            from datamesh.core.result import Err as E

            return E(StorageError("index", "add", "disk full", retryable=True))
        return real_add(self, docs)  # type: ignore[arg-type]

    monkeypatch.setattr(RegionalIndexes, "add_many", flaky)
    # when the first pass fails, the row stays with its error and a later due time
    report = indexer.drain_once(pipeline.tiers, pipeline.indexes).unwrap()
    assert report.failed == 1 and report.done == 0 and outbox_rows(pipeline) == 1
    status = indexer.outbox_status(pipeline.tiers).unwrap()
    assert status.regions["eu-west"].failing == 1 and "disk full" in status.worst[0][3]
    assert indexer.drain_once(pipeline.tiers, pipeline.indexes).unwrap().claimed == 0  # backing off
    # then a flush retries it and the turn becomes searchable
    assert (await pipeline.flush_index()).unwrap() == 1
    assert outbox_rows(pipeline) == 0
    assert (await pipeline.search(alpaca()[0]["instruction"])).unwrap()


async def test_one_bad_outbox_row_holds_back_no_other(pipeline: IngestionPipeline) -> None:
    from datamesh.pipeline import indexer
    from datamesh.storage.ap.record import turn_key

    bad, good = real_requests(2)
    lost = (await pipeline.ingest(bad)).unwrap()
    kept = (await pipeline.ingest(good)).unwrap()
    # Given the AP record of one committed turn is gone (a damaged shard)
    key = turn_key(bad.entity_id, lost.conversation_id, lost.turn_id)
    assert pipeline.tiers.ap.delete_many(GeoRegion.EU_WEST, [key]).unwrap() == 1
    # when the indexer runs, the bad row fails and stays, the good one is indexed
    report = indexer.drain_once(pipeline.tiers, pipeline.indexes).unwrap()
    assert (report.claimed, report.done, report.failed) == (2, 1, 1)
    assert "missing" in str(report.errors[0]) and outbox_rows(pipeline) == 1
    hits = (await pipeline.search(alpaca()[1]["instruction"])).unwrap()
    assert [h.conversation_id for h in hits] == [kept.conversation_id]
