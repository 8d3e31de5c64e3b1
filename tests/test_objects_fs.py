"""The filesystem object store: content addressing, dedup, atomic writes, verification."""

from __future__ import annotations

import errno
import io
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import pytest

from datamesh.core.errors import IntegrityError, NotFound
from datamesh.core.filesystems import NAME_COMMITTED_WITH_FILE, filesystem_type, name_committed_with_file
from datamesh.core.result import Err
from datamesh.core.types import ContentHash, GeoRegion
from datamesh.storage.objects import buffers
from datamesh.storage.objects.filesystem import LEVELS_FILE, FilesystemObjectStore, _fsync_with_folders
from datamesh.storage.objects.router import open_object_stores
from tests.conftest import service_missing


def test_put_is_idempotent_and_verified(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path)
    first = store.put(b"hello world").unwrap()
    again = store.put(b"hello world").unwrap()
    assert first.written and not again.written and first.content_hash == again.content_hash
    assert store.path_of(first.content_hash.hex).parent == tmp_path / first.content_hash.hex[:2]
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


def test_a_forked_child_can_put_after_the_parent_used_the_hashing_and_syncing_threads(tmp_path: Path) -> None:
    # Given a parent whose large and small puts started the hashing and folder-syncing threads
    store = FilesystemObjectStore(tmp_path)
    assert store.put(os.urandom(2 * 1024 * 1024)).unwrap().written
    assert store.put(b"small, synced with its folder").unwrap().written
    # When a forked child (a prefork worker) puts a large blob and a small one
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the puts complete (the alarm ends a hang)
        signal.alarm(20)
        ok = store.put(os.urandom(2 * 1024 * 1024)).unwrap().written and store.put(b"small too").unwrap().written
        os._exit(0 if ok else 1)
    # Then it completes
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def _calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record the order of renames, file fsyncs and folder fsyncs of the filesystem store."""
    import datamesh.storage.objects.filesystem as fs

    calls: list[str] = []
    real_fsync, real_replace, real_link = os.fsync, os.replace, os.link

    def fsync_dir(path: str) -> None:
        calls.append(f"dir {path}")
        fd = os.open(path, os.O_RDONLY)
        try:
            real_fsync(fd)
        finally:
            os.close(fd)

    def fsync(fd: int) -> None:  # a folder may be synced by its open fd
        folder = stat.S_ISDIR(os.fstat(fd).st_mode)
        calls.append(f"dir {os.readlink(f'/proc/self/fd/{fd}')}" if folder else "fsync")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda a, b: (calls.append("rename"), real_replace(a, b))[1])
    monkeypatch.setattr(os, "link", lambda a, b, **kw: (calls.append("link"), real_link(a, b, **kw))[1])
    monkeypatch.setattr(fs, "fsync_dir", fsync_dir)
    return calls


#: The two ways a small put makes its file: unnamed in the object's folder, or named in staging
#: (where the filesystem cannot make unnamed files).
WAYS = pytest.mark.parametrize("unnamed", [True, False], ids=["unnamed", "staged"])


def _store(root: Path, unnamed: bool, folder_fsync: str = "always") -> FilesystemObjectStore:
    store = FilesystemObjectStore(root, folder_fsync=folder_fsync)
    store._unnamed = unnamed
    return store


#: Whether the tests' own folder is on a filesystem whose file fsync commits the file's name.
NAME_WITH_FILE = name_committed_with_file(Path(tempfile.gettempdir()))


@WAYS
def test_a_small_put_is_linked_then_synced_with_its_folder_and_sealed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    # Given an empty store that fsyncs a small put's folder on every filesystem
    store = _store(tmp_path, unnamed, "always")
    calls = _calls(monkeypatch)
    # When a small blob is put
    key = store.put(b"small and new").unwrap().content_hash.hex
    # Then it was linked into place, then the file and its folder were synced (at the same time)
    assert calls[0] == "link" and sorted(calls[1:]) == sorted(["fsync", f"dir {tmp_path}/{key[:2]}"])
    # And it is sealed: its owner-write bit is clear
    assert store.path_of(key).stat().st_mode & 0o777 == 0o400


@WAYS
def test_by_default_a_small_put_skips_the_folder_fsync_only_where_the_file_fsync_commits_its_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    # Given a store with the default folder_fsync ("auto") on this machine's temporary folder
    store = _store(tmp_path, unnamed, "auto")
    assert store.syncs_small_folders is not name_committed_with_file(tmp_path)
    calls = _calls(monkeypatch)
    # When a small blob is put
    key = store.put(b"small and new").unwrap().content_hash.hex
    # Then it was linked into place before its file's fsync, and its folder was synced only where
    # that fsync does not commit the new name as well
    folder = [] if NAME_WITH_FILE else [f"dir {tmp_path}/{key[:2]}"]
    assert calls[0] == "link" and sorted(calls[1:]) == sorted(["fsync", *folder])
    assert store.path_of(key).stat().st_mode & 0o777 == 0o400


def test_a_store_on_a_filesystem_of_unknown_name_semantics_fsyncs_its_folders(tmp_path: Path) -> None:
    # Given a folder on tmpfs (not ext4, XFS or btrfs), when it is not on one of those
    shm = Path("/dev/shm")
    if not shm.is_dir() or filesystem_type(shm) in NAME_COMMITTED_WITH_FILE:
        service_missing("tmpfs", FileNotFoundError(f"/dev/shm is {filesystem_type(shm) if shm.is_dir() else 'absent'}"))
    root = Path(tempfile.mkdtemp(dir=shm))
    try:
        # Then the default store there fsyncs a small put's folder, as POSIX asks
        assert FilesystemObjectStore(root).syncs_small_folders
    finally:
        shutil.rmtree(root)


def test_an_unknown_folder_fsync_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="folder_fsync must be one of auto, always, got 'sometimes'"):
        FilesystemObjectStore(tmp_path, folder_fsync="sometimes")


@WAYS
def test_a_small_put_into_a_two_level_store_syncs_every_folder_it_made(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    # Given a store of the older two-level layout (found by its second-level folder)
    (tmp_path / "00" / "00").mkdir(parents=True)
    store = _store(tmp_path, unnamed)
    calls = _calls(monkeypatch)
    # When a small blob is put
    key = store.put(b"small and new").unwrap().content_hash.hex
    # Then it went two levels down, and every folder the put made was synced in its parent
    first, second = f"{tmp_path}/{key[:2]}", f"{tmp_path}/{key[:2]}/{key[2:4]}"
    assert store.path_of(key) == Path(second) / key
    # (an unnamed file is made once its folders are; a staged one's first link finds them missing)
    links = ["link"] if unnamed else ["link", "link"]
    assert calls[: len(links)] == links
    assert sorted(calls[len(links) :]) == sorted(["fsync", f"dir {tmp_path}", f"dir {first}", f"dir {second}"])
    assert store.path_of(key).stat().st_mode & 0o777 == 0o400


def test_a_large_put_is_synced_before_it_is_renamed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = FilesystemObjectStore(tmp_path)
    calls = _calls(monkeypatch)
    key = store.put(os.urandom(2 * 1024 * 1024)).unwrap().content_hash.hex
    assert calls.index("fsync") < calls.index("rename")
    assert store.path_of(key).stat().st_mode & 0o777 == 0o400


def _plant_unsealed(store: FilesystemObjectStore, key: ContentHash, content: bytes) -> Path:
    """Put ``content`` under ``key`` as a small put renamed before its fsync would leave it."""
    path = store.path_of(key.hex)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    path.chmod(0o600)
    return path


def _unsealed_intact(tmp_path: Path, data: bytes) -> tuple[FilesystemObjectStore, Path]:
    """A store holding ``data`` unsealed, as another put that has not yet synced it leaves it."""
    store = FilesystemObjectStore(tmp_path)
    return store, _plant_unsealed(store, ContentHash.of(data), data)


def _stored_large(tmp_path: Path, size: int) -> tuple[FilesystemObjectStore, bytes, ContentHash]:
    store = FilesystemObjectStore(tmp_path)
    data = os.urandom(size)
    return store, data, store.put(data).unwrap().content_hash


@pytest.mark.parametrize("torn", [b"", b"x" * 13, b"small and ne"], ids=["empty", "same size", "short"])
def test_a_torn_unsealed_object_is_replaced_by_the_next_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, torn: bytes
) -> None:
    # Given what a crash can leave of a small put renamed before its fsync: a torn, unsealed file
    store = FilesystemObjectStore(tmp_path)
    data = b"small and new"
    key = ContentHash.of(data)
    path = _plant_unsealed(store, key, torn)
    assert isinstance(store.get(key), Err)
    # When the same bytes are put again
    calls = _calls(monkeypatch)
    stored = store.put(data).unwrap()
    # Then the put writes them (it does not count the torn file as stored), synced before the rename
    # that replaces the torn file, and they read back sealed
    assert stored.written and store.get(key).unwrap() == data
    assert "link" not in calls and calls.index("fsync") < calls.index("rename")
    assert path.stat().st_mode & 0o777 == 0o400 and store.stale_staging() == []


def test_an_unsealed_intact_object_is_synced_and_sealed_by_a_dedup_put(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given another writer's small object, linked into place but not yet synced (unsealed)
    data = b"in flight elsewhere"
    store, path = _unsealed_intact(tmp_path, data)
    inode = path.stat().st_ino
    calls = _calls(monkeypatch)
    # When the same bytes are put
    stored = store.put(data).unwrap()
    # Then nothing is written, but the file (and its folder, where the file's fsync does not commit
    # its name) is synced before the put counts it stored
    assert not stored.written and path.stat().st_ino == inode
    assert calls == ["fsync"] + ([] if NAME_WITH_FILE else [f"dir {path.parent}"])
    assert path.stat().st_mode & 0o777 == 0o400
    # And a later dedup put trusts the sealed file without syncing it again
    calls.clear()
    assert store.put(data).unwrap().written is False and calls == []


def test_a_stream_put_replaces_a_torn_unsealed_object(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path)
    data = b"streamed small object"
    path = _plant_unsealed(store, ContentHash.of(data), b"\0" * len(data))
    assert store.put_stream(iter([data[:5], data[5:]])).unwrap().written
    assert path.read_bytes() == data and path.stat().st_mode & 0o777 == 0o400


def test_a_large_get_hashes_while_it_reads_and_catches_corruption(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a stored 3 MiB object
    store, data, key = _stored_large(tmp_path, 3 * 1024 * 1024)
    fed: list[int] = []
    real_feed = buffers.TrailingHash.feed

    def counted(self: buffers.TrailingHash, chunk: memoryview) -> None:
        fed.append(len(chunk))
        real_feed(self, chunk)

    monkeypatch.setattr(buffers.TrailingHash, "feed", counted)
    # When it is read, each chunk read is handed to the hashing thread, and together they are the object
    assert store.get(key).unwrap() == data and len(fed) > 1 and sum(fed) == len(data)
    # And a corrupted copy is an IntegrityError, never bytes
    path = store.path_of(key.hex)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    result = store.get(key)
    assert isinstance(result, Err) and isinstance(result.error, IntegrityError)


@WAYS
def test_a_small_put_that_loses_the_race_for_its_name_never_replaces_the_winner(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unnamed: bool
) -> None:
    # Given a put that found its key absent, and another put that publishes the same bytes before it
    store = _store(tmp_path, unnamed)
    data = b"two writers, one name"
    key = ContentHash.of(data)
    winner = _store(tmp_path, unnamed)
    path = store.path_of(key.hex)
    real_present = store._present
    inodes: list[int] = []

    def absent_then_published(key_hex: str, size: int) -> bool | None:
        monkeypatch.setattr(store, "_present", real_present)
        assert winner.put(data).unwrap().written
        inodes.append(path.stat().st_ino)
        return None

    monkeypatch.setattr(store, "_present", absent_then_published)
    # When the late put runs
    stored = store.put(data).unwrap()
    # Then its link is refused, it counts the winner's file as stored, and that file is untouched
    assert not stored.written and store.get(key).unwrap() == data
    assert [path.stat().st_ino] == inodes and path.stat().st_mode & 0o777 == 0o400
    assert store.stale_staging() == []


@WAYS
def test_processes_putting_the_same_small_blobs_at_once_store_each_once_whole_and_sealed(
    tmp_path: Path, unnamed: bool
) -> None:
    # Given 4 processes that put the same 200 small blobs, each from another start, at the same time
    blobs = [f"blob {i} ".encode() * (i % 7 + 1) for i in range(200)]
    children = []
    for n in range(4):
        pid = os.fork()
        if pid == 0:  # a child: exit 0 only if every put succeeded
            signal.alarm(60)
            store = _store(tmp_path, unnamed)
            order = blobs[n * 50 :] + blobs[: n * 50]  # each child starts at another blob
            ok = all(store.put(blob).is_ok() for blob in order)
            os._exit(0 if ok else 1)
        children.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children] == [0] * 4
    # Then every blob is stored once, reads back whole, and is sealed; staging is empty
    store = FilesystemObjectStore(tmp_path)
    keys = {ContentHash.of(blob) for blob in blobs}
    assert set(store.list().unwrap()) == keys
    for blob in blobs:
        key = ContentHash.of(blob)
        assert store.get(key).unwrap() == blob
        assert store.path_of(key.hex).stat().st_mode & 0o777 == 0o400
    assert store.stale_staging() == []


def test_an_unsealed_object_that_cannot_be_sealed_still_counts_once_verified_and_synced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an intact unsealed small object this process may not chmod (another account's file)
    data = b"written by another service account"
    store, path = _unsealed_intact(tmp_path, data)

    def refuse(fd: int, mode: int) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "fchmod", refuse)
    calls = _calls(monkeypatch)
    # When the same bytes are put, the put writes nothing: the file was verified and synced
    assert store.put(data).unwrap().written is False
    assert calls == ["fsync"] + ([] if NAME_WITH_FILE else [f"dir {path.parent}"])
    assert path.read_bytes() == data


def test_a_new_store_records_one_level_and_makes_its_folders(tmp_path: Path) -> None:
    store = FilesystemObjectStore(tmp_path)
    assert store.levels == 1 and (tmp_path / LEVELS_FILE).read_text() == "1\n"
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [f"{i:02x}" for i in range(256)]
    # Reopened, it keeps its layout; a folder removed since is made again by the put that needs it
    data = b"\x01 comes back"
    (tmp_path / ContentHash.of(data).hex[:2]).rmdir()
    again = FilesystemObjectStore(tmp_path)
    stored = again.put(data).unwrap()
    assert again.levels == 1 and again.get(stored.content_hash).unwrap() == data


def test_a_store_of_the_two_level_layout_keeps_it_and_its_objects(tmp_path: Path) -> None:
    # Given objects stored two levels down, as stores made before the layout was recorded hold them
    blobs = [f"object {i}".encode() for i in range(3)]
    for blob in blobs:
        key = ContentHash.of(blob).hex
        folder = tmp_path / key[:2] / key[2:4]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / key).write_bytes(blob)
    # When the store is opened (twice: the second time from its record)
    store = FilesystemObjectStore(tmp_path)
    assert store.levels == 2 and (tmp_path / LEVELS_FILE).read_text() == "2\n"
    store = FilesystemObjectStore(tmp_path)
    # Then it still reads, lists and dedups them, and new objects go two levels down too
    keys = [ContentHash.of(b) for b in blobs]
    assert store.levels == 2 and sorted(store.list().unwrap()) == sorted(keys)
    assert [store.get(k).unwrap() for k in keys] == blobs and not store.put(blobs[0]).unwrap().written
    new = store.put(b"a new object").unwrap().content_hash.hex
    assert store.path_of(new) == tmp_path / new[:2] / new[2:4] / new and store.path_of(new).is_file()


@pytest.mark.parametrize("recorded", ["3\n", "", "one"])
def test_a_bad_layout_record_is_a_clear_error_and_changes_nothing(tmp_path: Path, recorded: str) -> None:
    store = FilesystemObjectStore(tmp_path)
    stored = store.put(b"kept").unwrap()
    (tmp_path / LEVELS_FILE).write_text(recorded)
    with pytest.raises(ValueError, match=r"\.fanout must hold 1 or 2"):
        FilesystemObjectStore(tmp_path)
    assert (tmp_path / LEVELS_FILE).read_text() == recorded
    assert store.get(stored.content_hash).unwrap() == b"kept"


def test_a_folder_sync_failure_fails_the_sync_after_the_file_is_synced(tmp_path: Path) -> None:
    # Given an open file and a folder that is gone
    fd = os.open(tmp_path / "file", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        # When the file is synced together with the missing folder, the error reaches the caller
        with pytest.raises(FileNotFoundError):
            _fsync_with_folders(fd, [str(tmp_path), str(tmp_path / "gone")])
    finally:
        os.close(fd)


def test_a_filesystem_without_unnamed_files_gets_named_staging_files_from_then_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a filesystem that refuses O_TMPFILE
    real_open = os.open
    unnamed_opens: list[int] = []

    def refusing_open(path: str, flags: int, *args: object, **kwargs: object) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            unnamed_opens.append(flags)
            raise OSError(errno.EOPNOTSUPP, "Operation not supported")
        return real_open(path, flags, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", refusing_open)
    store = FilesystemObjectStore(tmp_path)
    # When small blobs are put
    keys = [store.put(f"small {i}".encode()).unwrap().content_hash for i in range(3)]
    # Then each is stored and sealed, the refusal was met once and remembered, staging is empty
    assert [store.get(k).unwrap() for k in keys] == [f"small {i}".encode() for i in range(3)]
    assert all(store.path_of(k.hex).stat().st_mode & 0o777 == 0o400 for k in keys)
    assert len(unnamed_opens) == 1 and store.stale_staging() == []


def test_a_two_level_store_that_cannot_record_its_layout_is_still_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datamesh.storage.objects.filesystem as fs

    # Given a two-level store whose root refuses writes (mounted read-only)
    blob = b"stored before the layout was recorded"
    key = ContentHash.of(blob).hex
    (tmp_path / key[:2] / key[2:4]).mkdir(parents=True)
    (tmp_path / key[:2] / key[2:4] / key).write_bytes(blob)
    (tmp_path / ".staging").mkdir()

    def read_only(path: Path, data: bytes, *, fsync: bool) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(path))

    monkeypatch.setattr(fs, "replace_durably", read_only)
    # When it is opened, then it is read as found
    store = FilesystemObjectStore(tmp_path)
    assert store.levels == 2 and store.get(ContentHash(key)).unwrap() == blob
    assert not (tmp_path / LEVELS_FILE).exists()
