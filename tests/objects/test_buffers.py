"""Gets read large objects into their final bytes while a second thread hashes them."""

from __future__ import annotations

import hashlib
import os
from typing import Any

import pytest

from datamesh.core.result import Ok
from datamesh.storage.objects import s3
from datamesh.storage.objects.base import HASHERS
from datamesh.storage.objects.buffers import TrailingHash, new_bytes

from .test_s3_transfers import store_with

MiB = 1024 * 1024


def test_a_new_bytes_object_is_filled_through_its_view() -> None:
    source = os.urandom(3 * MiB + 7)
    made = new_bytes(len(source))
    assert made is not None  # CPython reaches the C API
    data, view = made
    view[: MiB + 3] = source[: MiB + 3]
    view[MiB + 3 :] = source[MiB + 3 :]
    view.release()
    assert type(data) is bytes and data == source and hash(data) == hash(source)
    assert new_bytes(0) is None  # the empty bytes object is shared: never handed out to fill


def test_a_trailing_hash_hashes_every_chunk_fed_in_order() -> None:
    source = os.urandom(5 * MiB + 11)
    view = memoryview(source)
    hashing = TrailingHash()
    for offset in range(0, len(source), MiB):
        hashing.feed(view[offset : offset + MiB])
    assert hashing.result() == (hashlib.sha256(source).hexdigest(), len(source))


def test_an_abandoned_hash_frees_its_thread() -> None:
    # Given hashes abandoned mid-way, more of them than there are hashing threads
    for _ in range(HASHERS.workers + 1):
        hashing = TrailingHash()
        hashing.feed(memoryview(b"part of an object"))
        hashing.abandon()
    # Then the hashing threads still take new work
    assert HASHERS.get().submit(lambda: 42).result(timeout=10) == 42


@pytest.mark.parametrize("fresh", [True, False], ids=["into new bytes", "bytearray then copied"])
def test_an_s3_get_returns_the_whole_verified_bytes_either_way(
    s3_client: Any, bucket: str, monkeypatch: pytest.MonkeyPatch, fresh: bool
) -> None:
    # Given objects below and above the size hashed while reading, and a Python that may not fill bytes
    if not fresh:
        monkeypatch.setattr(s3, "new_bytes", lambda size: None)
    store = store_with(s3_client, bucket, chunk_bytes=MiB)
    blobs = [os.urandom(1000), os.urandom(3 * MiB + 5)]
    keys = [store.put(blob).unwrap().content_hash for blob in blobs]
    # When they are read, then each comes back whole, as bytes
    for key, blob in zip(keys, blobs, strict=True):
        result = store.get(key)
        assert result == Ok(blob) and type(result.unwrap()) is bytes
