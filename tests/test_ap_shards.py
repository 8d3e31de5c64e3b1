"""AP tier shards: stable routing, one writer per shard, batch writes, prefix scans."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest

from datamesh.core.errors import StorageError
from datamesh.core.result import Err
from datamesh.core.types import ContentHash, ConversationId, EntityId, GeoRegion, SagaId, TurnId
from datamesh.storage.ap.base import ShardError
from datamesh.storage.ap.record import Payload, RecordFormatError, TurnContent, encode_turn, turn_head, turn_key
from datamesh.storage.ap.sqlite_shard import SqliteShard
from datamesh.storage.ap.store import ContentStore, shard_for


def test_shard_choice_is_stable_across_processes() -> None:
    entity = EntityId.generate()
    here = shard_for(entity.value.bytes, 16)
    code = (
        "import uuid,sys; from datamesh.storage.ap.store import shard_for; "
        f"print(shard_for(uuid.UUID('{entity}').bytes, 16))"
    )
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert int(there) == here
    spread = {shard_for(EntityId.generate().value.bytes, 8) for _ in range(400)}
    assert spread == set(range(8))


def test_second_writer_is_refused(tmp_path: Path) -> None:
    first = SqliteShard(tmp_path / "s.sqlite3")
    with pytest.raises(ShardError, match="already has a writer"):
        SqliteShard(tmp_path / "s.sqlite3")
    reader = SqliteShard(tmp_path / "s.sqlite3", readonly=True)
    first.put_many([(b"k", b"v")])
    assert reader.get_many([b"k"]) == {b"k": b"v"}
    with pytest.raises(ShardError):
        reader.put_many([(b"x", b"y")])
    first.close()
    SqliteShard(tmp_path / "s.sqlite3").close()  # the lock is released on close


def test_content_store_round_trip_and_scan(tmp_path: Path) -> None:
    store = ContentStore(tmp_path, 4)
    entity = EntityId.generate()
    conversation = ConversationId.generate()
    saga = SagaId.generate()
    items = []
    for i in range(5):
        record = TurnContent(saga, Payload(inline=f"p{i}".encode()), Payload(ref=ContentHash.of(b"x")), (0.5, float(i)))
        items.append((turn_key(entity, conversation, TurnId.generate()), record.encode()))
    other = (turn_key(EntityId.generate(), conversation, TurnId.generate()), items[0][1])
    assert store.put_many(GeoRegion.EU_WEST, [*items, other]).unwrap() == 6
    scanned = store.scan_entity(GeoRegion.EU_WEST, entity).unwrap()
    assert [k for k, _ in scanned] == sorted(k for k, _ in items)
    assert TurnContent.decode(scanned[0][1]).prompt.inline == b"p0"
    assert store.count(GeoRegion.US_EAST).unwrap() == 0  # regions are separate files
    assert store.delete_many(GeoRegion.EU_WEST, [items[0][0], items[0][0]]).unwrap() == 1
    assert store.get_many(GeoRegion.EU_WEST, [items[0][0]]).unwrap() == {}
    store.close()


def test_store_failures_become_storage_errors(tmp_path: Path) -> None:
    owner = ContentStore(tmp_path, 1)
    owner.put_many(GeoRegion.EU_WEST, [(b"k" * 16, b"v")]).unwrap()
    rival = ContentStore(tmp_path, 1)
    result = rival.put_many(GeoRegion.EU_WEST, [(b"k" * 16, b"w")])
    assert isinstance(result, Err) and isinstance(result.error, StorageError) and result.error.retryable
    owner.close()
    rival.close()


def test_truncated_record_is_rejected() -> None:
    record = TurnContent(SagaId.generate(), Payload(inline=b"a"), Payload(inline=b"b")).encode()
    with pytest.raises(RecordFormatError):
        TurnContent.decode(record[:-3])


def test_record_bytes_follow_the_documented_layout() -> None:
    # version | saga id | prompt part | response part | embedding dim | f32s; part = kind | u32 length | bytes
    saga = SagaId.generate()
    ref = ContentHash.of(b"large")
    expected = (
        bytes([1])
        + saga.value.bytes
        + struct.pack("<BI", 0, 2)
        + b"pp"
        + struct.pack("<BI", 1, 32)
        + bytes.fromhex(ref.hex)
        + struct.pack("<I", 2)
        + struct.pack("<2f", 0.5, -2.0)
    )
    record = TurnContent(saga, Payload(inline=b"pp"), Payload(ref=ref), (0.5, -2.0))
    assert record.encode() == expected
    # the saga steps' path: inline payloads as bare bytes, the saga's head made once
    assert encode_turn(turn_head(saga), b"pp", Payload(ref=ref), (0.5, -2.0)) == expected
    assert TurnContent.decode(expected) == record
    plain = encode_turn(turn_head(saga), b"", bytearray(b"r"), None)
    head = bytes([1]) + saga.value.bytes
    assert plain == head + struct.pack("<BI", 0, 0) + struct.pack("<BI", 0, 1) + b"r" + bytes(4)
    assert TurnContent.decode(plain) == TurnContent(saga, Payload(inline=b""), Payload(inline=b"r"))
