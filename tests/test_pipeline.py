"""The seed API end to end, on SQLite and on the real PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import select, update

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import AccessDenied, Backpressure, IdempotencyConflict, NotFound, ValidationError
from datamesh.core.principal import Principal, Role
from datamesh.core.result import Err
from datamesh.core.types import ConversationId, EntityId, GeoRegion
from datamesh.pipeline.backpressure import TokenBucket
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.storage.cp import idempotency, provenance
from tests.helpers import real_requests, tier_counts


@pytest.fixture
async def pipeline(config: DataMeshConfig) -> AsyncIterator[IngestionPipeline]:
    created = await IngestionPipeline.create(config)
    async with created.unwrap() as p:
        yield p


def request(**changes: object) -> IngestionRequest:
    fields: dict[str, object] = {
        "entity_id": EntityId.generate(),
        "prompt": b"What is the capital of France?",
        "response": b"The capital of France is Paris.",
        "geo_region": GeoRegion.EU_WEST,
    }
    fields.update(changes)
    return IngestionRequest(**fields)  # type: ignore[arg-type]


async def test_ingest_then_read_back_verified(pipeline: IngestionPipeline) -> None:
    # Given real conversations, when each is ingested and read back
    for original in real_requests(12):
        response = (await pipeline.ingest(original)).unwrap()
        assert response.turn_seq == 0 and not response.deduplicated and response.latency_ms > 0
        stored = (await pipeline.get(response.conversation_id)).unwrap()
        # then the bytes are exactly what was sent and the owner and region are kept
        assert [(t.prompt, t.response) for t in stored.turns] == [(original.prompt, original.response)]
        assert stored.entity_id == original.entity_id and stored.region == GeoRegion.EU_WEST


async def test_large_payload_goes_to_the_object_store(pipeline: IngestionPipeline) -> None:
    big = b"x" * (pipeline.config.inline_max_bytes + 1)
    response = (await pipeline.ingest(request(response=big))).unwrap()
    turn = (await pipeline.get(response.conversation_id)).unwrap().turns[0]
    assert turn.response == big and turn.response_location == "objects" and turn.prompt_location == "ap"
    assert tier_counts(pipeline.tiers).blobs == 1


async def test_turns_append_in_order(pipeline: IngestionPipeline) -> None:
    first = request()
    started = (await pipeline.ingest(first)).unwrap()
    for i in range(1, 5):
        follow = request(
            entity_id=first.entity_id, prompt=f"follow-up {i}".encode(), conversation_id=started.conversation_id
        )
        assert (await pipeline.ingest(follow)).unwrap().turn_seq == i
    batch = [
        request(entity_id=first.entity_id, prompt=f"batched {i}".encode(), conversation_id=started.conversation_id)
        for i in range(3)
    ]
    seqs = [r.unwrap().turn_seq for r in (await pipeline.ingest_many(batch)).unwrap()]
    assert seqs == [5, 6, 7]
    stored = (await pipeline.get(started.conversation_id)).unwrap()
    assert [t.seq for t in stored.turns] == list(range(8))
    assert stored.turns[7].prompt == b"batched 2"


async def test_append_checks_the_target(pipeline: IngestionPipeline) -> None:
    unknown = await pipeline.ingest(request(conversation_id=ConversationId.generate()))
    assert isinstance(unknown, Err) and isinstance(unknown.error, NotFound)
    first = (await pipeline.ingest(request())).unwrap()
    stranger = await pipeline.ingest(request(conversation_id=first.conversation_id))
    assert isinstance(stranger, Err) and stranger.error.field == "conversation_id"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"prompt": "a str, not bytes"}, "prompt"),
        ({"prompt": b""}, "prompt"),
        ({"response": 42}, "response"),
        ({"geo_region": "mars-north"}, "geo_region"),
        ({"entity_id": "not-a-uuid"}, "entity_id"),
        ({"conversation_id": "12345"}, "conversation_id"),
        ({"idempotency_key": ""}, "idempotency_key"),
        ({"embedding": [1.0, float("nan")]}, "embedding"),
        ({"metadata": {"k": 3}}, "metadata"),
        ({"response": b"y" * 2048}, "response"),
    ],
)
async def test_bad_input_names_the_field_and_writes_nothing(
    config: DataMeshConfig, changes: dict[str, object], field: str
) -> None:
    created = await IngestionPipeline.create(config.with_changes(max_payload_bytes=1024))
    async with created.unwrap() as p:
        before = tier_counts(p.tiers)
        result = await p.ingest(request(**changes))
        assert isinstance(result, Err) and isinstance(result.error, ValidationError)
        assert result.error.field == field
        assert tier_counts(p.tiers) == before


async def test_replay_returns_the_first_response(pipeline: IngestionPipeline) -> None:
    original = request(idempotency_key="client-key-1")
    first = (await pipeline.ingest(original)).unwrap()
    before = tier_counts(pipeline.tiers)
    again = (await pipeline.ingest(original)).unwrap()
    assert again.deduplicated and again.conversation_id == first.conversation_id and again.turn_id == first.turn_id
    assert tier_counts(pipeline.tiers) == before  # no second write anywhere
    derived = request()
    assert (await pipeline.ingest(derived)).unwrap().conversation_id == (
        await pipeline.ingest(derived)
    ).unwrap().conversation_id


async def test_a_key_reads_completed_from_its_committed_saga(pipeline: IngestionPipeline) -> None:
    # Given a conversation and an appended turn, each under its own key
    original = request(idempotency_key="k-first")
    first = (await pipeline.ingest(original)).unwrap()
    append = request(idempotency_key="k-append", entity_id=original.entity_id, conversation_id=first.conversation_id)
    appended = (await pipeline.ingest(append)).unwrap()
    assert appended.turn_seq == 1
    tenant = pipeline.config.tenant

    def rows(conn: Any) -> dict[str, Any]:
        return {r.key: r for r in conn.execute(select(idempotency.KEYS).where(idempotency.KEYS.c.tenant == tenant))}

    # Then the pivot left the rows as reserve wrote them: ids set, no seq, no status update
    raw = pipeline.tiers.cp.run(rows, operation="t", write=False).unwrap()
    assert raw["k-append"].status == idempotency.PENDING and raw["k-append"].turn_seq is None
    assert raw["k-append"].turn_id == str(appended.turn_id)
    # ... yet the lookup reads them completed, with the committed turn's seq, from the saga
    states = pipeline.tiers.cp.run(
        lambda c: idempotency.lookup_many(c, tenant, ["k-first", "k-append"]), operation="t", write=False
    ).unwrap()
    assert states["k-append"].status == idempotency.COMPLETED and states["k-append"].turn_seq == 1
    assert states["k-first"].status == idempotency.COMPLETED and states["k-first"].turn_seq == 0
    # ... a replay is answered with the first result,
    again = (await pipeline.ingest(append)).unwrap()
    assert again.deduplicated and again.turn_id == appended.turn_id and again.turn_seq == 1
    # ... and a release aimed at the committed saga (never done: a second guard) deletes nothing.
    released = pipeline.tiers.cp.run(lambda c: idempotency.release(c, appended.saga_id), operation="t").unwrap()
    assert released == 0
    assert (await pipeline.ingest(append)).unwrap().deduplicated

    # A row written completed by an earlier version (the pivot's UPDATE) reads as it says.
    def mark_old(conn: Any) -> None:
        conn.execute(
            update(idempotency.KEYS)
            .where(idempotency.KEYS.c.key == "k-first")
            .values(status=idempotency.COMPLETED, turn_seq=0)
        )

    pipeline.tiers.cp.run(mark_old, operation="t").unwrap()
    replay = (await pipeline.ingest(original)).unwrap()
    assert replay.deduplicated and replay.turn_id == first.turn_id and replay.turn_seq == 0


async def test_same_key_other_payload_is_a_conflict(pipeline: IngestionPipeline) -> None:
    entity = EntityId.generate()
    (await pipeline.ingest(request(entity_id=entity, idempotency_key="k-2"))).unwrap()
    before = tier_counts(pipeline.tiers)
    clash = await pipeline.ingest(request(entity_id=entity, idempotency_key="k-2", response=b"another answer"))
    assert isinstance(clash, Err) and clash.error == IdempotencyConflict("k-2")
    assert tier_counts(pipeline.tiers) == before


async def test_fifty_concurrent_identical_requests_make_one_conversation(pipeline: IngestionPipeline) -> None:
    same = request()
    results = await asyncio.gather(*(pipeline.ingest(same) for _ in range(50)))
    ids = {r.unwrap().conversation_id for r in results}
    assert len(ids) == 1
    assert sum(not r.unwrap().deduplicated for r in results) == 1
    assert tier_counts(pipeline.tiers).rows["conversations"] == 1


async def test_batch_has_a_result_per_item(pipeline: IngestionPipeline) -> None:
    good = real_requests(20)
    batch = [*good[:10], request(prompt=b""), *good[10:], request(geo_region="nowhere")]
    results = (await pipeline.ingest_many(batch)).unwrap()
    assert [r.is_ok() for r in results] == [True] * 10 + [False] + [True] * 10 + [False]
    assert len({r.unwrap().saga_id for r in results if r.is_ok()}) == 1  # one saga for the batch
    assert tier_counts(pipeline.tiers).rows["turns"] == 20
    replay = (await pipeline.ingest_many(good)).unwrap()
    assert all(r.unwrap().deduplicated for r in replay)
    not_a_list = await pipeline.ingest_many("nope")  # type: ignore[arg-type]
    assert isinstance(not_a_list, Err) and not_a_list.error.field == "requests"  # type: ignore[union-attr]


async def test_provenance_chain_is_recorded_and_verifiable(pipeline: IngestionPipeline) -> None:
    first = (await pipeline.ingest(request())).unwrap()
    records = pipeline.tiers.cp.run(lambda c: provenance.records(c, str(first.conversation_id)), operation="t").unwrap()
    assert [r["kind"] for r in records] == ["turn_ingested", "content_stored"]
    checked, broken = pipeline.tiers.cp.run(
        lambda c: provenance.verify(c, str(first.conversation_id)), operation="t"
    ).unwrap()
    assert checked == 2 and broken is None


async def test_backpressure_rejects_with_retry_after(config: DataMeshConfig) -> None:
    # one token per 50 s: the refill cannot admit a fourth request during the test, however slow
    limited = config.with_changes(ingest_rate=0.02, ingest_burst=3, backpressure="reject")
    async with (await IngestionPipeline.create(limited)).unwrap() as p:
        results = [await p.ingest(r) for r in real_requests(5)]
        assert [r.is_ok() for r in results] == [True, True, True, False, False]
        refused = results[3]
        assert isinstance(refused, Err) and isinstance(refused.error, Backpressure)
        assert 0 < refused.error.retry_after_s <= 1 / 0.02 + 1e-6
        assert tier_counts(p.tiers).rows["conversations"] == 3  # refused means nothing written


def test_token_bucket_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=50.0, burst=2)
    assert bucket.try_take(2) == 0.0
    wait = bucket.try_take(1)
    assert 0 < wait <= 1 / 50 + 1e-6
    time.sleep(wait)
    assert bucket.try_take(1) == 0.0  # admitted once the advertised retry-after has passed
    assert bucket.try_take(5) > 0  # a take above the burst waits for a full bucket


async def test_backpressure_waits_by_default_and_drops_nothing(config: DataMeshConfig) -> None:
    limited = config.with_changes(ingest_rate=20.0, ingest_burst=2, max_in_flight=2)
    async with (await IngestionPipeline.create(limited)).unwrap() as p:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(*(p.ingest(r) for r in real_requests(8)))
        elapsed = loop.time() - started
        assert all(r.is_ok() for r in results)
        assert tier_counts(p.tiers).rows["conversations"] == 8
        assert elapsed >= (8 - 2) / 20.0 * 0.9  # six requests had to wait for tokens


async def test_principals_are_scoped_to_their_tenant_and_roles(pipeline: IngestionPipeline) -> None:
    alice = Principal(tenant="acme", name="alice", roles=frozenset({Role.WRITER}))
    reader = Principal(tenant="acme", name="rita", roles=frozenset({Role.READER}))
    mallory = Principal(tenant="other", name="mallory", roles=frozenset({Role.ADMIN}))
    written = (await pipeline.ingest(request(), principal=alice)).unwrap()
    assert (await pipeline.get(written.conversation_id, principal=reader)).is_ok()
    cross = await pipeline.get(written.conversation_id, principal=mallory)
    assert isinstance(cross, Err) and isinstance(cross.error, NotFound)  # not even its existence leaks
    refused = await pipeline.ingest(request(), principal=reader)
    assert isinstance(refused, Err) and isinstance(refused.error, AccessDenied)
    default = await pipeline.get(written.conversation_id)  # the local default principal is another tenant
    assert isinstance(default, Err) and isinstance(default.error, NotFound)
