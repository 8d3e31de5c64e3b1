"""Erasure: a conversation or an entity leaves every tier (CP status and provenance, AP, blobs, index)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from time import sleep

import pytest
from sqlalchemy import select

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import AccessDenied, NotFound, StorageError
from datamesh.core.principal import Principal, Role
from datamesh.core.result import Err, Ok
from datamesh.core.types import ConversationId, EntityId, GeoRegion
from datamesh.pipeline import erasure, indexer
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.storage.cp import conversations, index_outbox, provenance
from tests.helpers import alpaca, real_requests, tier_counts


@pytest.fixture
async def pipeline(config: DataMeshConfig) -> AsyncIterator[IngestionPipeline]:
    created = await IngestionPipeline.create(config.with_changes(indexer=False))
    async with created.unwrap() as p:
        yield p


def status_of(p: IngestionPipeline, conversation_id: str) -> str:
    rows = p.tiers.cp.run(
        lambda conn: conversations.get_many(conn, [conversation_id]), operation="test", write=False
    ).unwrap()
    return rows[conversation_id].status


def chain_kinds(p: IngestionPipeline, conversation_id: str) -> list[str]:
    records = p.tiers.cp.run(
        lambda conn: provenance.records(conn, conversation_id), operation="test", write=False
    ).unwrap()
    return [r["kind"] for r in records]


async def test_erase_conversation_removes_it_from_every_tier(pipeline: IngestionPipeline) -> None:
    # Given two conversations of one entity, one with a large response in the object store
    entity = EntityId.generate()
    big = b"big response " * (pipeline.config.inline_max_bytes // 8)
    row = alpaca()[5]
    doomed = IngestionRequest(entity_id=entity, prompt=row["instruction"].encode(), response=big, geo_region="eu-west")
    kept = real_requests(1)[0]
    erased_id = (await pipeline.ingest(doomed)).unwrap().conversation_id
    second = (await pipeline.ingest(replace(doomed, conversation_id=erased_id))).unwrap()
    kept_id = (await pipeline.ingest(kept)).unwrap().conversation_id
    (await pipeline.flush_index()).unwrap()
    before = tier_counts(pipeline.tiers)
    assert before.blobs == 1 and before.ap_rows == 3
    words = " ".join(row["instruction"].split()[:6])
    assert erased_id in [h.conversation_id for h in (await pipeline.search(words)).unwrap()]
    # When it is erased
    report = (await pipeline.erase_conversation(erased_id)).unwrap()
    assert report.conversations == [str(erased_id)] and report.turns == 2 and report.blobs_deleted == 1
    assert second.turn_seq == 1
    # then get answers NotFound, search finds nothing, and every tier has let go of it
    found = await pipeline.get(erased_id)
    assert isinstance(found, Err) and isinstance(found.error, NotFound)
    assert erased_id not in [h.conversation_id for h in (await pipeline.search(words, limit=50)).unwrap()]
    after = tier_counts(pipeline.tiers)
    assert after.ap_rows == 1 and after.blobs == 0 and after.rows["blobs"] == 0
    assert after.rows["index_outbox"] == 0
    index = pipeline.indexes.region(GeoRegion.EU_WEST).unwrap()
    assert index.count().unwrap() == 1
    assert status_of(pipeline, str(erased_id)) == conversations.ERASED
    assert chain_kinds(pipeline, str(erased_id))[-1] == provenance.ProvenanceKind.ERASED
    # and the other conversation is untouched
    assert (await pipeline.get(kept_id)).unwrap().turns[0].prompt == kept.prompt
    # erasing again is harmless; appending to an erased conversation is refused
    assert (await pipeline.erase_conversation(erased_id)).unwrap().conversations == []
    again = await pipeline.ingest(replace(doomed, conversation_id=erased_id, prompt=b"once more"))
    assert isinstance(again, Err) and isinstance(again.error, NotFound)


async def test_shared_blob_survives_until_its_last_conversation_is_erased(pipeline: IngestionPipeline) -> None:
    big = b"shared " * (pipeline.config.inline_max_bytes // 4)
    one, two = (
        IngestionRequest(entity_id=EntityId.generate(), prompt=b"p", response=big, geo_region="eu-west")
        for _ in range(2)
    )
    results = [r.unwrap() for r in (await pipeline.ingest_many([one, two])).unwrap()]  # one saga, one reference
    (await pipeline.erase_conversation(results[0].conversation_id)).unwrap()
    assert tier_counts(pipeline.tiers).blobs == 1
    assert (await pipeline.get(results[1].conversation_id)).unwrap().turns[0].response == big
    assert (await pipeline.erase_conversation(results[1].conversation_id)).unwrap().blobs_deleted == 1
    assert tier_counts(pipeline.tiers).blobs == 0


async def test_erase_entity_across_regions(pipeline: IngestionPipeline) -> None:
    entity = EntityId.generate()
    rows = alpaca()[:6]
    requests = [
        IngestionRequest(
            entity_id=entity,
            prompt=r["instruction"].encode(),
            response=r["output"].encode(),
            geo_region=GeoRegion.EU_WEST if i % 2 else GeoRegion.US_EAST,
        )
        for i, r in enumerate(rows)
    ]
    others = real_requests(4)
    (await pipeline.ingest_many(requests + others)).unwrap()
    (await pipeline.flush_index()).unwrap()
    assert (await pipeline.search("the", entity_id=entity, limit=50)).unwrap()
    report = (await pipeline.erase_entity(entity)).unwrap()
    assert len(report.conversations) == 6
    assert (await pipeline.search("the", entity_id=entity, limit=50)).unwrap() == []
    for region in (GeoRegion.EU_WEST, GeoRegion.US_EAST):
        assert pipeline.tiers.ap.scan_entity(region, entity).unwrap() == []
    counts = tier_counts(pipeline.tiers)
    assert counts.ap_rows == 4 and counts.rows["index_outbox"] == 0
    assert pipeline.indexes.region(GeoRegion.US_EAST).unwrap().count().unwrap() == 0
    assert pipeline.indexes.region(GeoRegion.EU_WEST).unwrap().count().unwrap() == 4
    for cid in report.conversations:
        assert status_of(pipeline, cid) == conversations.ERASED
    # erasing an entity that never existed is NotFound
    missing = await pipeline.erase_entity(EntityId.generate())
    assert isinstance(missing, Err) and isinstance(missing.error, NotFound)


async def test_who_may_erase(pipeline: IngestionPipeline) -> None:
    request = real_requests(1)[0]
    cid = (await pipeline.ingest(request)).unwrap().conversation_id
    tenant = pipeline.config.tenant
    reader = Principal(tenant=tenant, name="r", roles=frozenset({Role.READER}))
    other_writer = Principal(tenant=tenant, name="w", roles=frozenset({Role.WRITER}), entities=frozenset({"x"}))
    stranger = Principal(tenant="elsewhere", name="a", roles=frozenset({Role.ADMIN}))
    denied = await pipeline.erase_conversation(cid, principal=reader)
    assert isinstance(denied, Err) and isinstance(denied.error, AccessDenied)
    for who in (other_writer, stranger):
        hidden = await pipeline.erase_conversation(cid, principal=who)
        assert isinstance(hidden, Err) and isinstance(hidden.error, NotFound)
        hidden = await pipeline.erase_entity(request.entity_id, principal=who)
        assert isinstance(hidden, Err) and isinstance(hidden.error, NotFound)
    writer = Principal(
        tenant=tenant, name="w2", roles=frozenset({Role.WRITER}), entities=frozenset({str(request.entity_id)})
    )
    assert (await pipeline.erase_entity(request.entity_id, principal=writer)).unwrap().conversations == [str(cid)]


async def test_an_erasure_committed_while_a_batch_is_indexed_does_not_resurrect_it(
    pipeline: IngestionPipeline,
) -> None:
    from datamesh.pipeline import indexer

    result = (await pipeline.ingest(real_requests(1)[0])).unwrap()
    saga_docs = indexer.documents_of_saga(pipeline.tiers, result.saga_id, GeoRegion.EU_WEST).unwrap()
    # the erasure commits after the indexer read the content but before it indexes it
    (await pipeline.erase_conversation(result.conversation_id)).unwrap()
    indexer.index_documents(pipeline.tiers, pipeline.indexes, saga_docs, None).unwrap()
    assert pipeline.indexes.region(GeoRegion.EU_WEST).unwrap().count().unwrap() == 0


async def test_the_indexer_recheck_names_erased_and_absent_conversations_only(pipeline: IngestionPipeline) -> None:
    kept, erased = [(await pipeline.ingest(r)).unwrap().conversation_id for r in real_requests(2)]
    (await pipeline.erase_conversation(erased)).unwrap()
    absent = str(ConversationId.generate())
    ids = [str(kept), str(erased), absent, str(kept)]
    found = pipeline.tiers.cp.run(lambda conn: conversations.not_active(conn, ids), operation="t", write=False).unwrap()
    assert found == {str(erased), absent}
    assert (
        pipeline.tiers.cp.run(lambda conn: conversations.not_active(conn, []), operation="t", write=False).unwrap()
        == set()
    )


async def test_a_drain_that_hands_the_ap_deletes_off_leaves_the_row_to_the_shard_owner(
    pipeline: IngestionPipeline,
) -> None:
    def outbox() -> list[int]:
        rows = pipeline.tiers.cp.run(
            lambda conn: [r.id for r in conn.execute(select(index_outbox.OUTBOX))], operation="test", write=False
        )
        return rows.unwrap()

    # Given two indexed conversations of one entity
    requests = real_requests(2, entities=1)
    ids = [r.unwrap().conversation_id for r in (await pipeline.ingest_many(requests)).unwrap()]
    (await pipeline.flush_index()).unwrap()
    entity, region = requests[0].entity_id, GeoRegion.EU_WEST
    index = pipeline.indexes.region(region).unwrap()
    assert index.count().unwrap() == 2 and len(pipeline.tiers.ap.scan_entity(region, entity).unwrap()) == 2
    # and a drain that hands AP deletes to the shards' owners (as the Celery index worker does),
    # whose hand-off messages are lost
    handed: list[tuple[str, int]] = []
    settings = indexer.IndexerSettings(
        lease_s=0.3, hand_off_ap=lambda row, shard: handed.append((row.key, shard)) or Ok(None)
    )
    # When one conversation is erased and the drain runs
    erasure.erase_conversation(pipeline.tiers, Principal.local_default(pipeline.config.tenant), ids[0]).unwrap()
    report = indexer.drain_once(pipeline.tiers, pipeline.indexes, settings).unwrap()
    # then its index entry is gone, its AP deletes are handed to its shard, and its row stays owed
    shard = pipeline.tiers.ap.shard_of(entity)
    assert (report.claimed, report.done, report.handed_off, report.removed_turns) == (1, 0, 1, 1)
    assert handed == [(str(ids[0]), shard)] and index.count().unwrap() == 1
    assert len(pipeline.tiers.ap.scan_entity(region, entity).unwrap()) == 2
    # and while its lease runs, no drain hands it off again; once it lapses, the next drain does
    assert indexer.drain_once(pipeline.tiers, pipeline.indexes, settings).unwrap().claimed == 0
    sleep(0.4)
    assert indexer.drain_once(pipeline.tiers, pipeline.indexes, settings).unwrap().handed_off == 1
    assert handed == [(str(ids[0]), shard)] * 2
    # When the owner's deletes fail, the row records why and comes due again later
    failed = Err(StorageError("ap", "delete_many", "disk on fire", retryable=True))
    [row_id] = outbox()
    assert indexer.settle_handed_off(pipeline.tiers, settings, row_id, failed).unwrap().failed == 1
    errors = pipeline.tiers.cp.run(lambda c: index_outbox.last_errors(c), operation="test", write=False).unwrap()
    assert errors == [(index_outbox.ERASE_CONVERSATION, str(ids[0]), 1, str(failed.error))]
    # When the owner deletes the content and settles the row
    key = str(ids[0])
    deleted = indexer.erase_ap_content(pipeline.tiers, region, index_outbox.ERASE_CONVERSATION, key)
    assert deleted == Ok(1)
    assert indexer.settle_handed_off(pipeline.tiers, settings, row_id, deleted).unwrap().done == 1
    # then the outbox is empty, the other conversation's content is kept, and a duplicate changes nothing
    assert outbox() == [] and len(pipeline.tiers.ap.scan_entity(region, entity).unwrap()) == 1
    duplicate = indexer.settle_handed_off(pipeline.tiers, settings, row_id, deleted).unwrap()
    assert (duplicate.claimed, duplicate.done, duplicate.failed) == (0, 0, 0)
