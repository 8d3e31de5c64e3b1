"""The contract every shard engine keeps, run against ``SqliteShard`` and ``LsmShard`` alike."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from datamesh.core.types import EntityId, GeoRegion
from datamesh.storage.ap.base import ShardEngine, ShardError
from datamesh.storage.ap.lsm import lsm_engine
from datamesh.storage.ap.store import ContentStore

OpenShard = Callable[..., ShardEngine]


def _items(n: int, prefix: bytes = b"") -> list[tuple[bytes, bytes]]:
    return [(prefix + os.urandom(16), os.urandom(40)) for _ in range(n)]


def test_put_then_get_returns_the_values_and_leaves_out_missing_keys(open_shard: OpenShard) -> None:
    # Given a shard with a batch written
    shard = open_shard()
    items = _items(300)
    shard.put_many(items)
    # When the keys and one absent key are read
    found = shard.get_many([k for k, _ in items] + [b"absent"])
    # Then every written value comes back and the absent key is left out
    assert found == dict(items)


def test_a_later_put_replaces_the_value(open_shard: OpenShard) -> None:
    shard = open_shard()
    items = _items(200)
    shard.put_many(items)
    shard.put_many([(k, b"new") for k, _ in items[:50]])
    found = shard.get_many([k for k, _ in items])
    assert all(found[k] == b"new" for k, _ in items[:50])
    assert all(found[k] == v for k, v in items[50:])
    assert shard.count() == 200


def test_delete_counts_existing_keys_and_hides_them(open_shard: OpenShard) -> None:
    shard = open_shard()
    items = _items(100)
    shard.put_many(items)
    deleted = shard.delete_many([k for k, _ in items[:30]] + [b"never-written"])
    assert deleted == 30
    assert shard.get_many([k for k, _ in items[:30]]) == {}
    assert shard.count() == 70
    assert shard.delete_many([]) == 0


def test_scan_prefix_yields_only_the_prefix_in_key_order_with_a_limit(open_shard: OpenShard) -> None:
    shard = open_shard()
    mine = _items(40, prefix=b"\x01" * 16)
    edge = _items(10, prefix=b"\x01" * 15 + b"\xff")
    others = _items(200, prefix=b"\x02")
    shard.put_many(mine + others + edge)
    shard.delete_many([mine[0][0]])
    scanned = list(shard.scan_prefix(b"\x01" * 16))
    assert scanned == sorted(mine[1:])
    assert list(shard.scan_prefix(b"\x01" * 16, limit=5)) == sorted(mine[1:])[:5]
    assert list(shard.scan_prefix(b"\x01" * 15 + b"\xff")) == sorted(edge)
    assert len(list(shard.scan_prefix(b""))) == 249


def test_data_survives_close_and_reopen(open_shard: OpenShard) -> None:
    shard = open_shard()
    items = _items(500)
    shard.put_many(items)
    shard.delete_many([items[0][0]])
    shard.close()
    reopened = open_shard()
    assert reopened.get_many([k for k, _ in items]) == dict(items[1:])
    assert reopened.count() == 499


def test_one_writer_is_enforced_and_a_reader_cannot_write(open_shard: OpenShard) -> None:
    writer = open_shard()
    writer.put_many(_items(10))
    with pytest.raises(ShardError):
        open_shard()
    reader = open_shard(readonly=True)
    with pytest.raises(ShardError):
        reader.put_many(_items(1))


def test_a_reader_sees_what_a_closed_writer_wrote(open_shard: OpenShard) -> None:
    writer = open_shard()
    items = _items(120)
    writer.put_many(items)
    writer.close()
    reader = open_shard(readonly=True)
    assert reader.get_many([k for k, _ in items]) == dict(items)
    assert reader.count() == 120


def test_empty_batches_are_accepted(open_shard: OpenShard) -> None:
    shard = open_shard()
    shard.put_many([])
    assert shard.count() == 0
    assert list(shard.scan_prefix(b"x")) == []


def test_content_store_runs_on_the_lsm_engine(tmp_path: Path) -> None:
    # Given a content store whose shards are LSM engines
    store = ContentStore(tmp_path, 3, engine_factory=lsm_engine)
    entity = EntityId.generate()
    try:
        items = _items(90)
        # When content is written and read back through the store
        assert store.put_many(GeoRegion.US_EAST, items).unwrap() == 90
        assert store.get_many(GeoRegion.US_EAST, [k for k, _ in items]).unwrap() == dict(items)
        assert store.count(GeoRegion.US_EAST).unwrap() == 90
        turns = [(entity.value.bytes + bytes([i]), b"turn") for i in range(5)]
        store.put_many(GeoRegion.US_EAST, turns)
        assert store.scan_entity(GeoRegion.US_EAST, entity).unwrap() == turns
    finally:
        store.close()
    # Then the shards live as <root>/<region>/shard-NNN.lsm directories
    assert sorted(p.name for p in (tmp_path / GeoRegion.US_EAST.value).iterdir() if p.is_dir())[0] == "shard-000.lsm"
