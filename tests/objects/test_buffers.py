"""Gets read large objects into their final bytes while a second thread hashes them (both backends)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest

from datamesh.core.errors import IntegrityError
from datamesh.core.result import Err, Ok
from datamesh.storage.objects import buffers
from datamesh.storage.objects.base import HASHERS, ObjectStore
from datamesh.storage.objects.buffers import TrailingHash, new_bytes
from datamesh.storage.objects.filesystem import FilesystemObjectStore

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


@pytest.mark.parametrize("backend", ["fs", "s3"])
@pytest.mark.parametrize("fresh", [True, False], ids=["into new bytes", "bytearray then copied"])
def test_a_get_returns_the_whole_verified_bytes_either_way(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fresh: bool, backend: str
) -> None:
    # Given objects below and above the size hashed while reading, and a Python that may not fill bytes
    if not fresh:
        monkeypatch.setattr(buffers, "new_bytes", lambda size: None)
    store: ObjectStore[Any]
    if backend == "s3":
        store = store_with(request.getfixturevalue("s3_client"), request.getfixturevalue("bucket"), chunk_bytes=MiB)
    else:
        store = FilesystemObjectStore(tmp_path / "objects", chunk_bytes=MiB)
    blobs = [os.urandom(1000), os.urandom(3 * MiB + 5)]
    keys = [store.put(blob).unwrap().content_hash for blob in blobs]
    # When they are read, then each comes back whole, as bytes
    for key, blob in zip(keys, blobs, strict=True):
        result = store.get(key)
        assert result == Ok(blob) and type(result.unwrap()) is bytes


def test_a_large_fs_object_damaged_on_disk_is_refused(tmp_path: Path) -> None:
    # Given a large object whose file had one byte flipped on disk
    store = FilesystemObjectStore(tmp_path / "objects", chunk_bytes=MiB)
    blob = os.urandom(3 * MiB + 5)
    key = store.put(blob).unwrap().content_hash
    path = store.path_of(key.hex)
    os.chmod(path, 0o644)
    with open(path, "r+b") as handle:
        handle.seek(2 * MiB)
        handle.write(bytes([blob[2 * MiB] ^ 1]))
    # When it is read, then the read fails as an integrity error: the bad bytes never come back
    result = store.get(key)
    assert isinstance(result, Err) and isinstance(result.error, IntegrityError)
