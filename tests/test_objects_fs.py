"""The filesystem object store: content addressing, dedup, atomic writes, verification."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import pytest

from datamesh.core.errors import IntegrityError, NotFound
from datamesh.core.result import Err
from datamesh.core.types import ContentHash, GeoRegion
from datamesh.storage.objects.filesystem import FilesystemObjectStore
from datamesh.storage.objects.router import open_object_stores


def test_put_is_idempotent_and_verified(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path)
    first = store.put(b"hello world").unwrap()
    again = store.put(b"hello world").unwrap()
    assert first.written and not again.written and first.content_hash == again.content_hash
    assert store.path_of(first.content_hash.hex).parent.parent.name == first.content_hash.hex[:2]
    assert store.get(first.content_hash).unwrap() == b"hello world"
    assert store.list().unwrap() == [first.content_hash]
    assert store.stale_staging() == []


def test_stream_put_hashes_while_writing(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path, chunk_bytes=4096)
    data = bytes(range(256)) * 10_000
    stored = store.put_stream(io.BytesIO(data)).unwrap()
    assert stored.content_hash == ContentHash.of(data) and stored.size == len(data)
    assert store.put_stream(iter([data[:100], data[100:]])).unwrap().written is False


def test_corruption_is_an_error_never_bad_bytes(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path)
    key = store.put(b"precious").unwrap().content_hash
    store.path_of(key.hex).write_bytes(b"tampered")
    result = store.get(key)
    assert isinstance(result, Err) and isinstance(result.error, IntegrityError)
    missing = store.get(ContentHash.of(b"never stored"))
    assert isinstance(missing, Err) and isinstance(missing.error, NotFound)


def test_each_region_has_its_own_folder(tmp_path: Path) -> None:
    router = open_object_stores((tmp_path / "objects").as_uri()).unwrap()
    eu = router.for_region(GeoRegion.EU_WEST).unwrap()
    us = router.for_region(GeoRegion.US_EAST).unwrap()
    key = eu.put(b"eu only").unwrap().content_hash
    assert us.exists(key).unwrap() is False
    assert (tmp_path / "objects" / "eu-west").is_dir()
    bad = open_object_stores("ftp://example/x")
    assert isinstance(bad, Err) and bad.error.variable == "DATAMESH_OBJECTS_URL"


def test_writers_sharing_a_root_never_clash_on_staging_names(tmp_path: Path) -> None:
    # Given two stores on one root (two processes) whose staging counters start at the same number
    first, second = FilesystemObjectStore(tmp_path), FilesystemObjectStore(tmp_path)
    second._staging_prefix = first._staging_prefix  # the clash a fork could cause
    # When both write
    keys = [
        store.put(f"blob {i} of {n}".encode()).unwrap().content_hash
        for i in range(5)
        for n, store in enumerate((first, second))
    ]
    # Then every object is stored and nothing is left in staging
    assert sorted(keys) == sorted(first.list().unwrap()) and len(set(keys)) == 10
    assert first.stale_staging() == []


def test_put_creates_fan_out_folders_and_a_second_put_writes_nothing(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path)
    stored = store.put(b"x" * 5000).unwrap()
    path = store.path_of(stored.content_hash.hex)
    assert path.is_file() and path.read_bytes() == b"x" * 5000
    mtime = path.stat().st_mtime_ns
    assert store.put(b"x" * 5000).unwrap().written is False
    assert path.stat().st_mtime_ns == mtime and store.stale_staging() == []


def test_a_dedup_put_leaves_the_object_alone_and_a_new_put_syncs_before_publishing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a stored 2 MiB blob (large enough to be staged while it is hashed)
    store = FilesystemObjectStore(tmp_path)
    data = os.urandom(2 * 1024 * 1024)
    first = store.put(data).unwrap()
    path = store.path_of(first.content_hash.hex)
    inode, mtime = path.stat().st_ino, path.stat().st_mtime_ns
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    # When the same bytes are put again as a stream, nothing is flushed
    streamed = store.put_stream(io.BytesIO(data)).unwrap()
    assert synced == []
    # ... and as bytes (its staged copy may have been flushed while the hash was still running)
    again = store.put(data).unwrap()
    # Then the stored object is the same file, untouched, and staging is empty
    assert first.written and not again.written and not streamed.written
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (inode, mtime) and store.stale_staging() == []
    # And a new blob is synced (file, then folder) before the put returns
    synced.clear()
    assert store.put(os.urandom(2 * 1024 * 1024)).unwrap().written
    assert len(synced) >= 2


def test_a_forked_child_can_put_after_the_parent_used_the_hashing_threads(tmp_path: Path) -> None:
    # Given a parent whose large put started the hashing threads
    store = FilesystemObjectStore(tmp_path)
    assert store.put(os.urandom(2 * 1024 * 1024)).unwrap().written
    # When a forked child (a prefork worker) puts a large blob
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the put completes (the alarm ends a hang)
        signal.alarm(20)
        ok = store.put(os.urandom(2 * 1024 * 1024)).unwrap().written
        os._exit(0 if ok else 1)
    # Then it completes
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
