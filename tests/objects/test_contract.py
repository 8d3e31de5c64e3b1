"""The object store contract, run against every backend (filesystem and S3 over HTTP to moto)."""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from datamesh.core.errors import IntegrityError, NotFound, StorageError
from datamesh.core.result import Err, Ok
from datamesh.core.types import ContentHash
from datamesh.storage.objects.base import ObjectStore
from datamesh.storage.objects.scrub import scrub_store

from .conftest import TEST_PART_BYTES, corrupt

MiB = 1024 * 1024
FAR_FUTURE = datetime(2999, 1, 1, tzinfo=UTC)


def chunks_of(data: bytes, size: int = MiB) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def test_put_then_get_returns_the_bytes(store: ObjectStore[Any]) -> None:
    stored = store.put(b"hello, datamesh").unwrap()
    assert stored.content_hash == ContentHash.of(b"hello, datamesh")
    assert stored.written and stored.size == 15
    assert store.get(stored.content_hash) == Ok(b"hello, datamesh")


def test_empty_object_round_trips(store: ObjectStore[Any]) -> None:
    stored = store.put_stream(iter([])).unwrap()
    assert stored.content_hash == ContentHash.of(b"")
    assert store.get(stored.content_hash) == Ok(b"")


def test_same_content_is_stored_once(store: ObjectStore[Any]) -> None:
    first = store.put(b"same").unwrap()
    second = store.put(b"same").unwrap()
    third = store.put_stream(iter([b"sa", b"me"])).unwrap()
    assert first.written and not second.written and not third.written
    assert store.list().unwrap() == [first.content_hash]


def test_stream_longer_than_a_part_round_trips_and_leaves_no_staging(store: ObjectStore[Any]) -> None:
    data = os.urandom(2 * TEST_PART_BYTES + 12345)
    stored = store.put_stream(chunks_of(data)).unwrap()
    assert stored.content_hash == ContentHash.of(data) and stored.size == len(data)
    assert store.get(stored.content_hash) == Ok(data)
    again = store.put_stream(chunks_of(data)).unwrap()  # dedup of a staged stream discards the stage
    assert not again.written
    assert store.sweep_staging(older_than=FAR_FUTURE) == Ok(0)


def test_put_of_bytes_longer_than_a_part_round_trips(store: ObjectStore[Any]) -> None:
    data = os.urandom(TEST_PART_BYTES + 1)
    stored = store.put(data).unwrap()
    assert store.get(stored.content_hash) == Ok(data)
    assert store.sweep_staging(older_than=FAR_FUTURE) == Ok(0)


def test_put_stream_accepts_a_file(store: ObjectStore[Any]) -> None:
    data = os.urandom(3 * MiB + 7)
    stored = store.put_stream(io.BytesIO(data)).unwrap()
    assert stored.content_hash == ContentHash.of(data)


def test_read_into_streams_in_chunks(store: ObjectStore[Any]) -> None:
    data = os.urandom(3 * MiB + 1)
    key = store.put(data).unwrap().content_hash
    received: list[bytes] = []
    assert store.read_into(key, received.append) == Ok(len(data))
    assert len(received) > 1 and b"".join(received) == data


def test_missing_object_is_not_found(store: ObjectStore[Any]) -> None:
    key = ContentHash.of(b"never stored")
    assert store.get(key) == Err(NotFound("object", key.hex))
    assert store.exists(key) == Ok(False)


def test_delete_removes_once(store: ObjectStore[Any]) -> None:
    key = store.put(b"doomed").unwrap().content_hash
    assert store.exists(key) == Ok(True)
    assert store.delete(key) == Ok(True)
    assert store.delete(key) == Ok(False)
    assert isinstance(store.get(key).error, NotFound)
    assert store.list() == Ok([])


def test_list_with_mtime_reports_when_objects_were_written(store: ObjectStore[Any]) -> None:
    before = datetime.now(UTC) - timedelta(seconds=2)  # S3 times have one-second resolution
    keys = {store.put(f"blob {i}".encode()).unwrap().content_hash for i in range(3)}
    after = datetime.now(UTC) + timedelta(seconds=2)
    listed = store.list_with_mtime().unwrap()
    assert {k for k, _ in listed} == keys
    assert all(before <= mtime <= after and mtime.tzinfo is not None for _, mtime in listed)
    assert store.list_with_mtime(older_than=before) == Ok([])
    assert len(store.list_with_mtime(older_than=after).unwrap()) == 3


def test_corrupt_object_is_an_integrity_error_and_scrub_reports_it(store: ObjectStore[Any]) -> None:
    good = store.put(b"intact payload").unwrap().content_hash
    bad = store.put(b"payload that will rot" * 1000).unwrap().content_hash
    corrupt(store, bad.hex)

    result = store.get(bad)
    assert isinstance(result, Err) and isinstance(result.error, IntegrityError)
    assert result.error.expected == bad.hex
    assert store.get(good) == Ok(b"intact payload")

    referenced_but_gone = ContentHash.of(b"referenced by CP, never stored")
    report = scrub_store(store, expected=[good, bad, referenced_but_gone]).unwrap()
    assert report.checked == 2
    assert report.corrupt == [bad]
    assert report.missing == [referenced_but_gone]
    assert not report.ok


def test_failed_stream_leaves_nothing_behind(store: ObjectStore[Any]) -> None:
    def broken() -> Iterator[bytes]:
        yield os.urandom(TEST_PART_BYTES)
        yield os.urandom(TEST_PART_BYTES)
        raise OSError("client went away")

    result = store.put_stream(broken())
    assert isinstance(result, Err) and isinstance(result.error, StorageError)
    assert store.list() == Ok([])
    assert store.sweep_staging(older_than=FAR_FUTURE) == Ok(0)


def test_sweep_staging_removes_interrupted_writes(store: ObjectStore[Any]) -> None:
    store._stage(chunks_of(os.urandom(TEST_PART_BYTES + 1)))  # staged, never promoted: a crash
    assert store.sweep_staging(older_than=datetime.now(UTC) - timedelta(hours=1)) == Ok(0)
    assert store.sweep_staging(older_than=FAR_FUTURE) == Ok(1)
    assert store.list() == Ok([])
