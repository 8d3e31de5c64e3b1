"""Filesystem backend of the object store: ``<root>/ab/abcd…``, one level of 256 fan-out folders.

The 256 folders are made with the store, so no put has to make (and sync) a folder.  Stores made
before the layout was recorded use two levels (``<root>/ab/cd/abcd…``, folders made on demand) and
keep them: ``.fanout`` in the root names the number of levels, and a store without it is read as
two-level if it holds a second-level folder, else as a new one-level store.  One level holds ~14M
objects per folder before ext4's directory index needs its ``large_dir`` feature, so 3.6 billion.

A write goes to a temporary file and is renamed (or linked) into place, so a reader sees either the
whole object or nothing under its key.  A small object's file is unnamed (``O_TMPFILE``) in the
object's own folder until it is linked, where the filesystem can make one; other writes are staged
under a name in ``<root>/.staging``.  Before a put returns, the file is
fsynced and so is its folder; a fan-out folder the write had to create is fsynced in its parent too.

The folder fsync of a small put is skipped where the filesystem commits a name with the fsync of
the file it names (ext4, XFS, btrfs: :mod:`datamesh.core.filesystems`), since a small object is
linked before its fsync.  ``folder_fsync="always"`` (``DATAMESH_OBJECTS_FOLDER_FSYNC=always``)
keeps it everywhere; any other filesystem always gets it.  On a disk that flushes its cache for
every fsync, the folder's costs about a third of a small put.

Which comes first, the name or the file's fsync, depends on the size:

* A large object (and a stream) is fsynced in staging and renamed afterwards, so its name never
  points at bytes that are not on disk.
* A small object (up to :data:`EARLY_PUBLISH_MAX_BYTES`) is hard-linked into place first and
  fsynced after.  On a journalling filesystem the file's fsync then commits the data, the name and
  any new folder in one journal commit, which the folder fsyncs, started at the same moment on
  other threads, wait for too; fsync first and rename after costs two commits, about twice the
  time of a small put.
  A link, unlike a rename, never replaces a file, so a put cannot swap another put's object for
  bytes not yet on disk; a put that loses that race checks the winner's file instead.
  The price is that a crash before the fsync returns can leave a torn file under the key of a put
  that was never acknowledged.  So a put that finds its key present trusts the file only once it is
  *sealed*: a file whose owner-write bit is clear was fsynced, with its folder, before the bit was
  cleared.  An unsealed small file is read, hashed and synced (then sealed) before a put counts it
  as stored; a torn one is replaced the large way (synced, then renamed).  Large objects are sealed
  when they are published.  A get always verifies the hash, so a torn file is never returned as
  content either.

A small put costs a handful of syscalls (stat; open the folder; open an unnamed file in it; write;
link; fsync; fchmod; close both; where the folder is fsynced too, that runs on a syncer thread at
the same time as the file's, so that both wait for one journal commit), so the hot path uses ``os`` calls on string
paths rather than pathlib or tempfile.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import itertools
import os
import stat
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from datetime import UTC, datetime
from pathlib import Path

from datamesh.core.durable import fsync_dir, replace_durably
from datamesh.core.errors import StorageError
from datamesh.core.filesystems import name_committed_with_file
from datamesh.storage.objects.base import (
    DEFAULT_CHUNK_BYTES,
    OVERLAP_MIN_BYTES,
    ObjectMissing,
    ObjectStore,
    ThreadPool,
)
from datamesh.storage.objects.buffers import Filling
from datamesh.storage.objects.config import FOLDER_FSYNC_MODES

_RETRYABLE_ERRNOS = {
    errno.EAGAIN,
    errno.EINTR,
    errno.EBUSY,
    errno.ENOSPC,
    errno.EMFILE,
    errno.ENFILE,
}
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC
_FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_O_TMPFILE: int = getattr(os, "O_TMPFILE", 0)  # Linux only; elsewhere small puts stage named files
_UNNAMED_FLAGS = _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC
#: What opening an unnamed file fails with where the filesystem (or kernel) cannot make one.
_NO_UNNAMED_ERRNOS = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL}
#: Small puts are linked into place before their fsync (see the module docstring).
EARLY_PUBLISH_MAX_BYTES = OVERLAP_MIN_BYTES  # smaller puts take ``_write``; larger ones are staged while hashed
#: What writing into a store mounted (or owned) read-only fails with.
_READ_ONLY_ERRNOS = {errno.EROFS, errno.EACCES, errno.EPERM}
#: Names the store's fan-out depth (see the module docstring).
LEVELS_FILE = ".fanout"
#: Threads that fsync a put's folders while its file is fsynced (see ``_fsync_with_folders``):
#: a put into a new folder of a two-level store syncs up to three.
SYNCERS = ThreadPool(3, "datamesh-fsync")
_UNSEALED = 0o600
_SEALED = 0o400  # the owner-write bit is clear: the file and its folder entry are on disk


class FilesystemObjectStore(ObjectStore[str]):
    """Content-addressed objects under ``root`` on a local filesystem."""

    backend = "fs"
    stage_while_hashing = True

    def __init__(
        self,
        root: Path,
        *,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        fsync: bool = True,
        folder_fsync: str = "auto",
    ) -> None:
        if folder_fsync not in FOLDER_FSYNC_MODES:
            raise ValueError(f"folder_fsync must be one of {', '.join(FOLDER_FSYNC_MODES)}, got {folder_fsync!r}")
        self.root = Path(root)
        self.chunk_bytes = chunk_bytes
        self.fsync = fsync
        self._staging = self.root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)
        #: Whether a small put (linked before its fsync) also fsyncs its folders: see the docstring.
        self.syncs_small_folders = folder_fsync == "always" or not name_committed_with_file(self.root)
        # Paths are plain strings on the hot path: pathlib costs more than the syscalls of a small put.
        self._root_str = os.fspath(self.root)
        self.levels = self._read_or_record_levels()
        if self.levels == 1:
            self._make_first_level()
        # Staging names: a random tag per store plus a counter (O_EXCL catches the rare clash,
        # e.g. after a fork), instead of mkstemp's random name per put.
        self._staging_prefix = os.path.join(os.fspath(self._staging), f"put-{os.urandom(6).hex()}-")
        self._sequence = itertools.count()
        #: Small puts write an unnamed file in the object's folder (``O_TMPFILE``) until the
        #: filesystem turns out not to support it; then they stage a named file.
        self._unnamed = _O_TMPFILE != 0

    def path_of(self, key: str) -> Path:
        """Where the object ``key`` lives (fan-out folders keep each folder's listing small)."""
        return Path(self._path(key))

    def _path(self, key: str) -> str:
        if self.levels == 1:
            return f"{self._root_str}/{key[:2]}/{key}"
        return f"{self._root_str}/{key[:2]}/{key[2:4]}/{key}"

    def _read_or_record_levels(self) -> int:
        """The store's fan-out depth: from ``.fanout``, else found (and then recorded)."""
        marker = self.root / LEVELS_FILE
        try:
            text = marker.read_text(encoding="ascii").strip()
        except FileNotFoundError:
            levels = 2 if self._has_second_level() else 1
            try:
                replace_durably(marker, f"{levels}\n".encode("ascii"), fsync=self.fsync)
            except OSError as exc:
                if exc.errno not in _READ_ONLY_ERRNOS:
                    raise
                # A store mounted read-only is read as found; a writable open records it.
            return levels
        except (UnicodeDecodeError, OSError) as exc:
            raise ValueError(f"object store {self.root}: cannot read {LEVELS_FILE}: {exc}") from exc
        if text not in ("1", "2"):
            raise ValueError(
                f"object store {self.root}: {LEVELS_FILE} must hold 1 or 2 (fan-out levels), found {text[:40]!r}"
            )
        return int(text)

    def _has_second_level(self) -> bool:
        """Whether a folder of the two-level layout exists (``<root>/ab/cd/``): a store made before
        the layout was recorded."""
        for first in os.scandir(self._root_str):
            if len(first.name) != 2 or not first.is_dir(follow_symlinks=False):
                continue
            if any(entry.is_dir(follow_symlinks=False) for entry in os.scandir(first.path)):
                return True
        return False

    def _exists(self, key: str) -> bool:
        try:
            return stat.S_ISREG(os.stat(self._path(key)).st_mode)
        except FileNotFoundError:
            return False

    def _holds(self, key: str, size: int) -> bool:
        """Whether ``key`` is stored whole and durably, so a put of its ``size`` bytes writes nothing."""
        return self._present(key, size) is True

    def _present(self, key: str, size: int) -> bool | None:
        """``None`` when ``key`` is absent, ``True`` when it is stored whole and durably, ``False``
        when a torn file holds its name.

        A sealed file is trusted as it is.  An unsealed one may be another put's small object that
        was linked into place and is not yet synced, or what a crash left of one: it counts only if
        its bytes hash to ``key``, and then it is synced and sealed first.
        """
        path = self._path(key)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        if not stat.S_ISREG(st.st_mode) or st.st_size != size:
            return False
        if not st.st_mode & stat.S_IWUSR or size > EARLY_PUBLISH_MAX_BYTES:
            return True  # sealed, or large (only small objects are linked before they are synced)
        return self._seal(path, key, size)

    def _seal(self, path: str, key: str, size: int) -> bool | None:
        """Check an unsealed object's bytes against ``key``; if they match, sync and seal it."""
        try:
            fd = os.open(path, _READ_FLAGS)
        except FileNotFoundError:
            return None
        try:
            if hashlib.sha256(os.read(fd, size + 1)).hexdigest() != key:
                return False
            if self.fsync:
                os.fsync(fd)
                if self.syncs_small_folders:
                    fsync_dir(path[: -len(key) - 1])
            # Another account's file may refuse the chmod: it is verified and synced, so it counts as
            # stored all the same; only the next put checks it again.
            with contextlib.suppress(PermissionError):
                os.fchmod(fd, _SEALED)
        finally:
            os.close(fd)
        return True

    def _write(self, key: str, data: bytes) -> bool:
        present = self._present(key, len(data))
        if present:
            return False
        if present is None and len(data) <= EARLY_PUBLISH_MAX_BYTES:
            if self._publish_early(key, data):
                return True
            if self._holds(key, len(data)):  # another put published it first
                return False
        # Large, or replacing a torn file: synced before the rename, so whatever the rename replaces
        # (perhaps another put's good copy by now) is replaced by bytes already on disk.
        self._publish(self._stage((data,), durable=True), key)
        return True

    def _publish_early(self, key: str, data: bytes) -> bool:
        """Link the bytes into place, then sync the file and the folders, then seal it.

        A link never replaces a file: if one holds the name already (another put won the race),
        nothing is published and ``False`` is returned.  Replacing it with bytes not yet synced
        could turn another put's acknowledged object into a torn one if the machine crashed.
        """
        if self._unnamed:
            published = self._publish_unnamed(key, data)
            if published is not None:
                return published
            self._unnamed = False  # this filesystem makes no unnamed files: name them in staging
        fd, name = self._create_staging_file(_UNSEALED)
        try:
            try:
                _write_all(fd, data)
                folders = self._link(name, key)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name)  # the object keeps its own link
            if folders is None:
                return False
            if self.fsync:
                self._sync_linked(fd, folders)
            os.fchmod(fd, _SEALED)
        finally:
            os.close(fd)
        return True

    def _publish_unnamed(self, key: str, data: bytes) -> bool | None:
        """:meth:`_publish_early` by an unnamed file (``O_TMPFILE``) made in the object's folder.

        The file has no name until it is linked as ``key``, so no staging entry is made and removed,
        and a crash leaves nothing behind.  ``None`` when the filesystem cannot do it.
        """
        target = self._path(key)
        folder = target[: -len(key) - 1]
        made: list[str | int] = []
        try:
            folder_fd = os.open(folder, _FOLDER_FLAGS)
        except FileNotFoundError:
            made = [*self._make_folders(key)]
            folder_fd = os.open(folder, _FOLDER_FLAGS)
        try:
            try:
                fd = os.open(".", _UNNAMED_FLAGS, _UNSEALED, dir_fd=folder_fd)
            except OSError as exc:
                if exc.errno in _NO_UNNAMED_ERRNOS:
                    return None
                raise
            try:
                _write_all(fd, data)
                try:  # a real folder fd makes os.link call linkat, following the /proc link to the file
                    os.link(f"/proc/self/fd/{fd}", key, dst_dir_fd=folder_fd)
                except FileExistsError:
                    return False
                except FileNotFoundError:  # no /proc to name the file by
                    return None
                if self.fsync:
                    self._sync_linked(fd, [*made, folder_fd])
                os.fchmod(fd, _SEALED)
            finally:
                os.close(fd)
        finally:
            os.close(folder_fd)
        return True

    def _sync_linked(self, fd: int, folders: Sequence[str | int]) -> None:
        """Make a small object linked before its fsync durable, name included: one journal commit."""
        if self.syncs_small_folders:
            _fsync_with_folders(fd, folders)
        else:
            os.fsync(fd)  # commits the bytes, the link and any new folder here (see the docstring)

    def _link(self, token: str, key: str) -> list[str] | None:
        """Link ``token`` as ``key`` unless the name exists (``None``); return the folders to fsync."""
        try:
            return self._place(os.link, token, key)
        except FileExistsError:
            return None

    def _stage(self, chunks: Iterable[bytes], *, durable: bool = False) -> str:
        """Write ``chunks`` to a new staging file; fsynced only with ``durable``.

        A staged write whose hash turns out to be stored already is discarded unsynced, so a
        dedup put costs no disk flush; :meth:`_promote` syncs it before it is published.
        """
        fd, name = self._create_staging_file(_SEALED)  # published only once synced
        try:
            for chunk in chunks:
                _write_all(fd, chunk)
            if durable and self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name)
            raise
        os.close(fd)
        return name

    def _create_staging_file(self, mode: int) -> tuple[int, str]:
        while True:
            name = f"{self._staging_prefix}{next(self._sequence)}"
            try:
                return os.open(name, _CREATE_FLAGS, mode), name
            except FileExistsError:
                continue

    def _flush_staged(self, token: str) -> None:
        if self.fsync:
            fd = os.open(token, _READ_FLAGS)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def _promote(self, token: str, key: str) -> None:
        self._flush_staged(token)  # the staged bytes reach the disk before their name does (cheap if flushed)
        self._publish(token, key)

    def _publish(self, token: str, key: str) -> None:
        """Rename the synced staging file ``token`` to ``key`` and sync the folders."""
        folders = self._rename(token, key)
        if self.fsync:
            for folder in folders:
                fsync_dir(folder)

    def _rename(self, token: str, key: str) -> list[str]:
        """Rename ``token`` to ``key`` (atomic; identical bytes if another writer won the race)."""
        return self._place(os.replace, token, key)

    def _place(self, move: Callable[[str, str], None], token: str, key: str) -> list[str]:
        """``move(token, path of key)``, making the fan-out folders if missing; return the folders
        to fsync before the put is acknowledged (the object's, and the parent of any new one)."""
        target = self._path(key)
        folder = target[: -len(key) - 1]
        try:
            move(token, target)
        except FileNotFoundError:
            if not os.path.exists(token):
                raise
            made = self._make_folders(key)
            move(token, target)
            return [*made, folder]
        return [folder]

    def _make_first_level(self) -> None:
        """Make the 256 first-level fan-out folders once, when the store is new.

        A young store's puts then make no folder: a folder is an inode to create and an entry to
        sync, which cost a new store's first puts as much as the object itself.  Folders are made
        in order, so the last one present means all are; a folder removed later is made again by
        the put that needs it (``_make_folders``).
        """
        if os.path.isdir(f"{self._root_str}/ff"):
            return
        for first in range(256):
            with contextlib.suppress(FileExistsError):
                os.mkdir(f"{self._root_str}/{first:02x}")
        if self.fsync:
            fsync_dir(self._root_str)

    def _make_folders(self, key: str) -> list[str]:
        """Create the fan-out folders of ``key``; return the parents whose entries must be synced."""
        first = f"{self._root_str}/{key[:2]}"
        if self.levels == 1:  # its folder was removed after the store was made
            with contextlib.suppress(FileExistsError):
                os.mkdir(first)
            return [self._root_str]
        second = f"{first}/{key[2:4]}"
        try:
            os.mkdir(second)
        except FileNotFoundError:
            with contextlib.suppress(FileExistsError):  # another writer made it
                os.mkdir(first)
            with contextlib.suppress(FileExistsError):
                os.mkdir(second)
            return [self._root_str, first]
        except FileExistsError:  # another writer made it; sync its entry anyway before acknowledging
            pass
        return [first]

    def _discard(self, token: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(token)

    def _read_all(self, key: str) -> bytes:
        fd = self._open_fd(key)
        try:
            return self._read_fd(fd, os.fstat(fd).st_size)
        finally:
            os.close(fd)

    def _read_hashed(self, key: str) -> tuple[str, bytes]:
        """Read the object into one new ``bytes``, a chunk at a time, while a hashing thread hashes
        the chunks already read (:class:`~.buffers.Filling`); small objects are hashed once read.

        The hash trails the read by a chunk, over memory still in the CPU cache, on the other core:
        a verified get of a large object costs about the read or the hash, whichever is slower,
        and the digest is of the very bytes returned.  (Hashing a second read of the file on the
        other thread instead copies every byte out of the page cache twice: measured 76-90% of a
        plain read's rate for 64 MiB objects against 86-96% this way.)
        """
        fd = self._open_fd(key)
        try:
            size = os.fstat(fd).st_size
            if size < OVERLAP_MIN_BYTES:
                data = self._read_fd(fd, size)
                return hashlib.sha256(data).hexdigest(), data
            filling = Filling(size)
            try:
                if not filling.read_from(lambda view: os.preadv(fd, [view], filling.offset), self.chunk_bytes):
                    # truncated in place while read (datamesh never does)
                    raise OSError(errno.EIO, f"object {key} ended at byte {filling.offset} of {size} while read")
                return filling.finish()
            finally:
                filling.end()
        finally:
            os.close(fd)

    def _open_fd(self, key: str) -> int:
        try:
            return os.open(self._path(key), _READ_FLAGS)
        except FileNotFoundError:
            raise ObjectMissing(key) from None

    def _read_fd(self, fd: int, size: int) -> bytes:
        data = os.read(fd, size)
        if len(data) == size:  # the usual case: one read, no EOF probe (objects never grow)
            return data
        parts = [data]  # a short read (objects beyond the largest single read)
        while chunk := os.read(fd, self.chunk_bytes):
            parts.append(chunk)
        return b"".join(parts)

    def _digest(self, key: str) -> tuple[str, int]:
        fd = self._open_fd(key)
        try:
            return self._digest_fd(fd)
        finally:
            os.close(fd)

    def _digest_fd(self, fd: int) -> tuple[str, int]:
        """SHA-256 and size of the open file ``fd``, read by offset (the fd's position is untouched).

        One buffer read into over and over stays in the CPU cache: hashing runs near its own rate.
        """
        buffer = bytearray(self.chunk_bytes)
        view = memoryview(buffer)
        sha = hashlib.sha256()
        size = 0
        while count := os.preadv(fd, [buffer], size):
            sha.update(view[:count])
            size += count
        return sha.hexdigest(), size

    def _open(self, key: str) -> Iterator[bytes]:
        fd = self._open_fd(key)
        try:
            while chunk := os.read(fd, self.chunk_bytes):
                yield chunk
        finally:
            os.close(fd)

    def _delete(self, key: str) -> bool:
        path = self.path_of(key)
        try:
            path.unlink()
        except FileNotFoundError:
            return False
        if self.fsync:
            fsync_dir(path.parent)
        return True

    def _keys(self) -> Iterator[str]:
        for first in sorted(self.root.iterdir()):
            if first.name.startswith(".") or not first.is_dir():
                continue
            if self.levels == 1:
                yield from sorted(p.name for p in first.iterdir() if p.is_file())
                continue
            for second in sorted(first.iterdir()):
                if second.is_dir():
                    yield from sorted(p.name for p in second.iterdir() if p.is_file())

    def _keys_with_mtime(self) -> Iterator[tuple[str, datetime]]:
        for key in self._keys():
            try:
                mtime = self.path_of(key).stat().st_mtime
            except FileNotFoundError:  # deleted between listing and stat
                continue
            yield key, datetime.fromtimestamp(mtime, tz=UTC)

    def _sweep_staging(self, older_than: datetime) -> int:
        cutoff = older_than.timestamp()
        removed = 0
        for path in self._staging.iterdir():
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed

    def _translate(self, exc: Exception, operation: str) -> StorageError:
        retryable = isinstance(exc, OSError) and exc.errno in _RETRYABLE_ERRNOS
        return StorageError("objects", f"fs.{operation}", str(exc), retryable=retryable, cause=repr(exc))

    def stale_staging(self) -> list[Path]:
        """Temporary files left by interrupted writes (GC removes those older than its grace)."""
        return sorted(self._staging.iterdir())


def _write_all(fd: int, data: bytes) -> None:
    """``os.write`` until every byte is written (a write may be short)."""
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)
        while written < len(data):
            written += os.write(fd, view[written:])


def _fsync_with_folders(fd: int, folders: Sequence[str | int]) -> None:
    """fsync the file ``fd`` on this thread and each of ``folders`` (paths or open folders) on a
    syncer thread, all at once.

    Started together, the syncs wait for one journal commit.  One after the other, each folder's
    fsync finds its entry committed already and still makes the disk flush its cache, which cost
    ~40-80 us per folder here, a quarter of a small put.  Every sync has returned (the first error
    is raised) before this returns.
    """
    pool = SYNCERS.get()
    pending = [pool.submit(_fsync_folder, folder) for folder in folders]
    try:
        os.fsync(fd)
    finally:
        futures.wait(pending)
    for done in pending:
        done.result()


def _fsync_folder(folder: str | int) -> None:
    if isinstance(folder, int):
        os.fsync(folder)
    else:
        fsync_dir(folder)
