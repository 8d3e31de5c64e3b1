"""Access is applied inside the query: tenants, entities, time ranges, regions, and erasure."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

from datamesh.core.errors import StorageError, ValidationError
from datamesh.core.types import EntityId, GeoRegion
from datamesh.storage.index import IndexConfig, RegionalIndexes, SearchIndex
from datamesh.storage.index.document import AccessFilter
from datamesh.storage.index.fulltext import FullTextStore
from tests.index.conftest import DIM, T0, make_doc, random_vector


def test_a_tenant_never_sees_another_tenants_hits_not_even_in_counts_or_ranks(index: SearchIndex) -> None:
    rng = np.random.default_rng(1)
    # Given tenant "other" with many strong matches, vectors near the query; and "acme" with two weak ones
    query = random_vector(rng)
    near = tuple(float(x) for x in np.asarray(query) + 0.01 * rng.standard_normal(DIM))
    others = [make_doc("secret", "secret " * 5, tenant="other", embedding=near) for _ in range(50)]
    mine = [make_doc("mine", f"long text {i} " * 30 + "secret", embedding=random_vector(rng)) for i in range(2)]
    index.add_many(others + mine).unwrap()
    mine_ids = {d.turn_id for d in mine}
    # When acme searches by text, vector and both with a limit far above its own count
    for kwargs in ({"text": "secret"}, {"vector": query}, {"text": "secret", "vector": query}):
        hits = index.search(**kwargs, tenant="acme", limit=100).unwrap()  # type: ignore[arg-type]
        # Then only acme's two turns come back, as they would without the other tenant
        assert {h.turn_id for h in hits} == mine_ids, kwargs
    # And the ranks and scores are those of an index holding acme's turns alone
    alone = SearchIndex.open(index.directory.parent / "alone", GeoRegion.EU_WEST, config=index.config).unwrap()
    alone.add_many(mine).unwrap()
    for kwargs in ({"text": "secret"}, {"vector": query}, {"text": "long secret", "vector": query}):
        with_other = index.search(**kwargs, tenant="acme").unwrap()  # type: ignore[arg-type]
        without = alone.search(**kwargs, tenant="acme").unwrap()  # type: ignore[arg-type]
        # bm25 statistics included: the other tenant's 50 "secret" turns do not move acme's scores
        assert [(h.turn_id, round(h.score, 6)) for h in with_other] == [(h.turn_id, round(h.score, 6)) for h in without]
    alone.close()
    # And an unknown tenant sees nothing
    assert index.search("secret", vector=query, tenant="nobody").unwrap() == []


def test_entity_restriction_and_time_range_are_part_of_the_query(index: SearchIndex) -> None:
    rng = np.random.default_rng(2)
    alice, bob = EntityId.generate(), EntityId.generate()
    docs = [
        make_doc("hello", "world", entity=e, minutes=m, embedding=random_vector(rng))
        for e in (alice, bob)
        for m in (0, 60)
    ]
    index.add_many(docs).unwrap()
    q = random_vector(rng)
    for kwargs in ({"text": "world"}, {"vector": q}):
        assert len(index.search(**kwargs, tenant="acme").unwrap()) == 4  # type: ignore[arg-type]
        only_alice = index.search(**kwargs, tenant="acme", allowed_entities={alice}).unwrap()  # type: ignore[arg-type]
        assert {h.turn_id for h in only_alice} == {d.turn_id for d in docs if d.entity_id == alice}
        assert index.search(**kwargs, tenant="acme", allowed_entities=set()).unwrap() == []  # type: ignore[arg-type]
        narrowed = index.search(**kwargs, tenant="acme", allowed_entities={alice}, entity_id=bob).unwrap()  # type: ignore[arg-type]
        assert narrowed == []
        late = index.search(**kwargs, tenant="acme", since=T0 + timedelta(minutes=30)).unwrap()  # type: ignore[arg-type]
        assert {h.turn_id for h in late} == {d.turn_id for d in docs if d.created_at > T0}
        early = index.search(**kwargs, tenant="acme", entity_id=bob, until=T0 + timedelta(minutes=60)).unwrap()  # type: ignore[arg-type]
        assert {h.turn_id for h in early} == {d.turn_id for d in docs if d.entity_id == bob and d.created_at == T0}


def test_a_regions_index_holds_only_that_regions_documents(tmp_path: Path) -> None:
    indexes = RegionalIndexes(tmp_path, config=IndexConfig(dim=DIM, synchronous="NORMAL"))
    eu = make_doc("bonjour", "le monde", region=GeoRegion.EU_WEST)
    us = make_doc("hello", "le monde", region=GeoRegion.US_EAST)
    # When a mixed batch is routed
    assert indexes.add_many([eu, us]).unwrap() == 2
    eu_index = indexes.region(GeoRegion.EU_WEST).unwrap()
    us_index = indexes.region(GeoRegion.US_EAST).unwrap()
    # Then each region's files hold only its own document
    assert [h.turn_id for h in eu_index.search("monde", tenant="acme").unwrap()] == [eu.turn_id]
    assert [h.turn_id for h in us_index.search("monde", tenant="acme").unwrap()] == [us.turn_id]
    assert eu_index.directory == tmp_path / "eu-west"
    assert b"hello" not in (tmp_path / "eu-west" / "text.sqlite").read_bytes()
    # And a region's index refuses another region's document, writing nothing
    refused = eu_index.add_many([make_doc("x", "y", region=GeoRegion.US_WEST)])
    assert isinstance(refused.error, ValidationError) and refused.error.field == "region"
    assert eu_index.count().unwrap() == 1
    indexes.close().unwrap()


@pytest.mark.parametrize("how", ["conversation", "entity"])
def test_removed_conversation_is_no_longer_found_by_text_or_vector(tmp_path: Path, how: str) -> None:
    config = IndexConfig(dim=DIM, synchronous="NORMAL")
    index = SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=config).unwrap()
    rng = np.random.default_rng(3)
    gone, kept = make_doc("forget me", "zebra", embedding=random_vector(rng)), make_doc("keep", "zebra")
    index.add_many([gone, kept]).unwrap()
    assert gone.embedding is not None
    if how == "conversation":
        assert index.remove_conversations([gone.conversation_id]).unwrap() == 1
    else:
        assert index.remove_entity(gone.entity_id).unwrap() == 1
    assert [h.turn_id for h in index.search("zebra", tenant="acme").unwrap()] == [kept.turn_id]
    assert index.search(vector=gone.embedding, tenant="acme").unwrap() == []
    assert index.search("forget", tenant="acme").unwrap() == []
    index.close().unwrap()
    # And after reopening (snapshot + SQLite) it stays gone, with no trace of its vector on disk
    reopened = SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=config).unwrap()
    assert reopened.search(vector=gone.embedding, tenant="acme").unwrap() == []
    raw = np.asarray(gone.embedding, dtype=np.float32).tobytes()
    for name in ("vectors.faiss", "text.sqlite"):
        assert raw not in (tmp_path / "eu-west" / name).read_bytes()
    reopened.close()


def test_redelivered_batch_replaces_instead_of_duplicating(index: SearchIndex) -> None:
    doc = make_doc("same", "turn", embedding=random_vector(np.random.default_rng(4)))
    index.add_many([doc]).unwrap()
    index.add_many([doc]).unwrap()
    assert index.count().unwrap() == 1
    assert doc.embedding is not None
    assert len(index.search(vector=doc.embedding, tenant="acme").unwrap()) == 1


def test_bad_documents_and_arguments_are_validation_errors(index: SearchIndex) -> None:
    wrong_dim = make_doc("p", "r", embedding=(1.0, 2.0))
    assert isinstance(index.add_many([make_doc("ok", "ok"), wrong_dim]).error, ValidationError)
    assert index.count().unwrap() == 0
    assert isinstance(index.search(tenant="acme").error, ValidationError)
    assert isinstance(index.search("x", tenant="acme", limit=0).error, ValidationError)
    assert isinstance(index.search(vector=(0.0,) * DIM, tenant="acme").error, ValidationError)


def test_a_second_writer_is_refused_with_a_retryable_storage_error(index: SearchIndex) -> None:
    second = SearchIndex.open(index.directory.parent, GeoRegion.EU_WEST, config=index.config)
    assert isinstance(second.error, StorageError) and second.error.retryable


def test_a_rolled_back_transaction_never_lets_two_tenants_share_a_full_text_table(tmp_path: Path) -> None:
    store = FullTextStore(tmp_path / "text.sqlite3", synchronous="NORMAL")
    # Given a transaction that made tenant-a's table and then failed (a disk error, say)
    with pytest.raises(RuntimeError), store._tx() as db:
        store._table(db, "tenant-a")
        raise RuntimeError("write failed")
    # When tenant-b and then tenant-a index a turn each
    b = make_doc("bravo secret words", tenant="tenant-b")
    a = make_doc("alpha public words", tenant="tenant-a")
    store.upsert([b], [None])
    store.upsert([a], [None])
    # then each has a table of its own, and neither finds the other's words
    tables = dict(store._db.execute("SELECT name, id FROM tenants").fetchall())
    assert len(set(tables.values())) == 2 and store._tenants == tables
    for tenant, own, other in (("tenant-a", "alpha", "bravo"), ("tenant-b", "bravo", "alpha")):
        allowed = AccessFilter(tenant=tenant)
        assert [h.turn_id for h in store.search(own, allowed, 10)] == [str((a if tenant == "tenant-a" else b).turn_id)]
        assert store.search(other, allowed, 10) == []
    store.close()
