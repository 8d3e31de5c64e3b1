"""Sorted runs: immutable SQLite files (WAL mode) of packed, checksummed blocks with a sparse index.

What is stored: one SQLite row per *block* of ``block_entries`` sorted entries (sized to fill the
pages, :func:`fit_block_entries`: 72 entries of 16+200 bytes), in a rowid table whose key ``id`` is
the block's number in key order.  Each row also holds the block's first and last key, its entry
count and a checksum of its data.  The sparse index is the ``first_key`` column read into memory
(or handed over by the writer that built the run): a point lookup finds its block with one
``bisect`` over it and fetches that block by ``id``.  SQLite has no index on ``first_key``.

Why blocks: a run stored as one SQLite row per key caps the flush near the rate at which SQLite
appends rows (a B-tree insert and a Python-to-SQLite call per key); packing sorted blocks of
entries per row, with a sparse index, is one way past it, and it was chosen by measuring both
(``bench/bench_lsm.py`` measures a row per key against packed blocks at the start of each run).
Measured: with the journal off both are close, e.g. ~300k rows/s for a row per key against
~350k rows/s for blocks of 64 (blocks of 256 were no faster, and make a point lookup read and
checksum 4x the bytes), and a row-per-key run in WAL mode with ``synchronous=NORMAL`` wrote ~165k
rows/s.  Blocks also give every block a checksum and leave a merge far fewer rows to step through.

Layout of ``NNNNNNNN.sqlite3`` (format 3)::

    blocks(id INTEGER PRIMARY KEY, first_key BLOB, last_key BLOB, n INTEGER, checksum INTEGER, data BLOB)
    meta(name TEXT PRIMARY KEY, value BLOB)   -- format, entries, tombstones, min/max key, key width,
                                              -- key filter, ...

``id`` numbers the blocks in key order.  Format 1 keyed the table by ``first_key`` (``WITHOUT
ROWID``); measured on 14 KB blocks, a rowid table is written about twice as fast (~1 GB/s against
~0.5 GB/s: SQLite appends to a rowid B-tree, and a ``WITHOUT ROWID`` row that large is a poor fit),
and nothing needs SQLite's index on ``first_key``: the sparse index is the ``first_key`` column
held in memory, and a block is fetched by its ``id``.  Format 2 checksummed each block with
``zlib.crc32``; format 3 stores :func:`~.format.block_checksum` (``xxh3_64`` as a signed 64-bit
integer), about ten times cheaper per byte.  A run of format 1 or 2 is refused with an error naming
both versions.  ``key_width`` is the width shared by every key (0 if they differ): merges of
runs of one width take the vectorised path of :mod:`.columns`.

A run is written once, in key order, without a journal (until the manifest names it, it is scratch
that recovery deletes), then switched to WAL mode and fsynced before the manifest names it.
Afterwards nothing writes it again, so readers (in any process) open it with ``immutable=1``: no
locks, no shared memory file.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datamesh.storage.ap.lsm.columns import Columns, EncodedBlock, Scratch, concat, decode_blocks, encode_blocks
from datamesh.storage.ap.lsm.filter import DEFAULT_PARTITION, FilterBuilder, KeyFilter, fingerprints
from datamesh.storage.ap.lsm.format import (
    FormatError,
    Value,
    block_checksum,
    decode_entries,
    encode_entries,
    find_entry,
)
from datamesh.storage.ap.lsm.memtable import MISSING

FORMAT_VERSION = 3
SYNC_EVERY_BYTES = 8 << 20  # fdatasync a run being built this often (see RunWriter._emit)
PAGE_SIZE = 65536  # the largest SQLite page: a block of a few dozen KiB sits in one or two pages
BLOCKS_PER_PAGE = 4
"""Blocks sized to fit this many to a page (:func:`fit_block_entries`): ~16 KiB, small enough that
a point lookup decodes little, large enough that SQLite's per-row cost is spread thin."""
_ROW_OVERHEAD = 96  # a blocks row besides its data and two keys: id, n, checksum, headers, cell pointer
_MAX_FIT_ENTRIES = 1024


def fit_block_entries(key_width: int, entry_bytes: float) -> int:
    """Entries per block so that ``BLOCKS_PER_PAGE`` blocks fill one page, given entries of about
    ``entry_bytes`` (key and value) with keys about ``key_width`` wide.

    A fixed entry count leaves pages part empty: 64 entries of 16+200 bytes are 14.4 KiB, four
    to a 64 KiB page, and the run file is ~1.2x its payload; 72 fill the page (~1.08x), and a
    merge pass, which reads and writes every page, measured ~15% less CPU per row.
    """
    room = PAGE_SIZE // BLOCKS_PER_PAGE - _ROW_OVERHEAD - 2 * key_width - 4  # 4: the block's count
    per_entry = entry_bytes + 9  # a flag byte and two u32 lengths (:mod:`.format`)
    return max(1, min(_MAX_FIT_ENTRIES, int(room // per_entry)))


MMAP_BYTES = 1 << 30  # readers map runs into memory: a block read is a memcpy, not a read syscall
_SCHEMA = (
    "CREATE TABLE blocks(id INTEGER PRIMARY KEY, first_key BLOB NOT NULL, last_key BLOB NOT NULL,"
    " n INTEGER NOT NULL, checksum INTEGER NOT NULL, data BLOB NOT NULL)",
    "CREATE TABLE meta(name TEXT PRIMARY KEY, value BLOB)",
)

Block = tuple[list[bytes], list[Value]]


@dataclass(frozen=True, slots=True)
class RunSummary:
    """What a finished run holds; the manifest keeps it so stats need not open the file."""

    entries: int
    tombstones: int
    payload_bytes: int
    file_bytes: int
    min_key: bytes
    max_key: bytes
    index: list[bytes] = field(default_factory=list, compare=False, repr=False)
    """Every block's first key, in order (what :class:`Run` would otherwise read back from the file)."""


class RunWriter:
    """Writes one run from chunks of entries given in strictly increasing key order.

    Chunks come as lists (:meth:`add`) or as :class:`~.columns.Columns` (:meth:`add_columns`, the
    vectorised path); a writer fed both falls back to lists for the rest of the run.  A chunk of
    columns is not kept past the call (its arrays may be a :class:`~.columns.Scratch`'s, reused
    for the next chunk), and blocks are encoded into a scratch buffer of the writer's own.
    """

    def __init__(self, path: Path, *, block_entries: int | None, scratch: Scratch | None = None) -> None:
        """``block_entries=None`` sizes blocks to fill pages, from the first chunk's entries; blocks
        are encoded in ``scratch``'s ``blocks`` buffer (a fresh one if None)."""
        self.path = path
        self._index: list[bytes] = []
        self._block_entries = block_entries or 0  # 0: chosen by the first chunk (_size_blocks)
        self._db = sqlite3.connect(path, isolation_level=None)
        # Built without a journal: until the manifest names it the file is scratch (recovery deletes
        # it), so a rollback journal or WAL would only write every page twice.  ``finish`` switches
        # the finished file to WAL mode, which is recorded in its header.
        self._db.execute(f"PRAGMA page_size={PAGE_SIZE}")
        self._db.execute("PRAGMA journal_mode=OFF")
        self._db.execute("PRAGMA synchronous=OFF")
        for statement in _SCHEMA:
            self._db.execute(statement)
        self._db.execute("BEGIN")
        self._keys: list[bytes] = []
        self._values: list[Value] = []
        self._columns: Columns | None = None  # fewer than ``block_entries`` entries awaiting a block
        self._scratch = scratch or Scratch()  # encoded blocks, reused from one chunk to the next
        self._next_id = 0
        self._sync_fd = os.open(path, os.O_RDONLY)
        self._unsynced = 0
        self._filter = FilterBuilder()
        if block_entries:
            self._size_blocks(block_entries)
        self._entries = 0
        self._tombstones = 0
        self._payload = 0
        self._width: int | None = None  # the width shared by every key so far, 0 once they differ
        self._min_key: bytes | None = None
        self._max_key = b""

    def _size_blocks(self, block_entries: int) -> None:
        """Fix the run's entries per block; its filter's partitions are a whole number of blocks."""
        self._block_entries = block_entries
        self._filter = FilterBuilder(block_entries * max(1, DEFAULT_PARTITION // block_entries))

    def _note_width(self, width: int) -> None:
        self._width = width if self._width in (None, width) else 0

    def add(self, keys: list[bytes], values: list[Value]) -> None:
        if not keys:
            return
        if self._columns is not None:
            pending_keys, pending_values = self._columns.to_lists()
            self._columns = None
            self._keys.extend(pending_keys)
            self._values.extend(pending_values)
        if not self._block_entries:
            key_bytes = sum(map(len, keys))
            value_bytes = sum(map(len, filter(None, values)))
            self._size_blocks(fit_block_entries(key_bytes // len(keys), (key_bytes + value_bytes) / len(keys)))
        if self._min_key is None:
            self._min_key = keys[0]
        self._max_key = keys[-1]
        widest = max(map(len, keys))
        self._note_width(widest if min(map(len, keys)) == widest else 0)
        self._keys.extend(keys)
        self._values.extend(values)
        self._filter.add(keys)
        self._entries += len(keys)
        self._tombstones += values.count(None)
        self._payload += sum(map(len, keys)) + sum(map(len, filter(None, values)))
        if len(self._keys) >= self._block_entries:
            self._emit(final=False)

    def add_columns(self, columns: Columns) -> None:
        if not len(columns):
            return
        if self._keys:
            self.add(*columns.to_lists())
            return
        if not self._block_entries:
            self._size_blocks(fit_block_entries(columns.width, columns.width + len(columns.values) / len(columns)))
        if self._min_key is None:
            self._min_key = columns.key_at(0)
        self._max_key = columns.key_at(-1)
        self._note_width(columns.width)
        self._filter.add_fingerprints(fingerprints(columns.keys))
        self._entries += len(columns)
        self._tombstones += int(columns.tombstones.sum())
        self._payload += len(columns) * columns.width + len(columns.values)
        size = self._block_entries
        if self._columns is not None:  # complete the pending block first: only it is copied again
            take = min(size - len(self._columns), len(columns))
            head = concat([self._columns, columns.slice(0, take)])
            columns = columns.slice(take, len(columns))
            self._columns = head.copy() if len(head) < size else None
            if self._columns is None:
                self._insert(encode_blocks(head, size))
            if not len(columns):
                return
        full = len(columns) - len(columns) % size
        # The tail is copied: the chunk's arrays may be reused once this call returns.
        self._columns = columns.slice(full, len(columns)).copy() if full < len(columns) else None
        if full:
            self._insert(encode_blocks(columns.slice(0, full), size, self._scratch))

    def _emit(self, *, final: bool) -> None:
        size = self._block_entries
        keys, values = self._keys, self._values
        stop = len(keys) if final else len(keys) - len(keys) % size
        rows: list[EncodedBlock] = []
        for start in range(0, stop, size):
            end = min(start + size, stop)
            data = encode_entries(keys[start:end], values[start:end])
            rows.append((keys[start], keys[end - 1], end - start, block_checksum(data), data))
        self._keys, self._values = keys[stop:], values[stop:]
        self._insert(rows)

    def _insert(self, rows: list[EncodedBlock]) -> None:
        first_id = self._next_id
        self._next_id += len(rows)
        self._db.executemany(
            "INSERT INTO blocks VALUES (?, ?, ?, ?, ?, ?)",
            [(first_id + number, *row) for number, row in enumerate(rows)],
        )
        self._index.extend([row[0] for row in rows])
        # Push the run to disk as it grows: on ext4 (data=ordered) a log fdatasync can wait for all
        # dirty data of the filesystem, so one big fsync at the end would stall writers for its length.
        self._unsynced += sum(len(row[4]) for row in rows)
        if self._unsynced >= SYNC_EVERY_BYTES:
            os.fdatasync(self._sync_fd)
            self._unsynced = 0

    def finish(self) -> RunSummary:
        """Commit, fold the WAL into the file and fsync it; the run is then immutable."""
        if self._columns is not None:
            self._insert(encode_blocks(self._columns, self._block_entries))
            self._columns = None
        if not self._block_entries:  # no entry at all
            self._size_blocks(1)
        self._emit(final=True)
        key_filter = self._filter.finish()
        meta = {
            "format": FORMAT_VERSION,
            "entries": self._entries,
            "tombstones": self._tombstones,
            "payload_bytes": self._payload,
            "min_key": self._min_key or b"",
            "max_key": self._max_key,
            "key_width": self._width or 0,
            "filter": key_filter.to_bytes(),
            "filter_partition": key_filter.partition,
            "block_entries": self._block_entries,
        }
        self._db.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        self._db.execute("COMMIT")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.close()
        try:
            os.fsync(self._sync_fd)
        finally:
            os.close(self._sync_fd)
        return RunSummary(
            entries=self._entries,
            tombstones=self._tombstones,
            payload_bytes=self._payload,
            file_bytes=self.path.stat().st_size,
            min_key=self._min_key or b"",
            max_key=self._max_key,
            index=self._index,
        )

    def abort(self) -> None:
        self._db.close()
        os.close(self._sync_fd)
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.path}{suffix}").unlink(missing_ok=True)


def write_run(
    path: Path,
    chunks: Iterable[Block | Columns],
    *,
    block_entries: int | None,
    cancelled: Callable[[], bool] = lambda: False,
    scratch: Scratch | None = None,
) -> RunSummary | None:
    """Write sorted chunks into a finished run; None (and no file) if ``cancelled`` or no entries.

    ``block_entries=None`` sizes the blocks to fill pages (:func:`fit_block_entries`); ``scratch``
    holds the encoded blocks (it may be the one the chunks are built in: the roles differ).
    """
    writer = RunWriter(path, block_entries=block_entries, scratch=scratch)
    try:
        for chunk in chunks:
            if cancelled():
                writer.abort()
                return None
            if isinstance(chunk, Columns):
                writer.add_columns(chunk)
            else:
                writer.add(*chunk)
        summary = writer.finish()
    except BaseException:
        writer.abort()
        raise
    if not summary.entries:
        path.unlink(missing_ok=True)
        return None
    return summary


def check_format(path: Path, db: sqlite3.Connection) -> dict[str, Any]:
    """The run's meta table, or :class:`FormatError` if the file is not a run of this format."""
    meta: dict[str, Any] = dict(db.execute("SELECT name, value FROM meta"))
    version = meta.get("format")
    if version != FORMAT_VERSION:
        raise FormatError(
            f"{path}: run format {version!r}, this datamesh reads run format {FORMAT_VERSION} only"
            " (format 1 and 2 runs came from an older datamesh; rewrite the shard with that version's export)"
        )
    return meta


def _connect_immutable(path: Path, *, mmap: bool = True) -> sqlite3.Connection:
    uri = path.resolve().as_uri() + "?mode=ro&immutable=1"
    db = sqlite3.connect(uri, uri=True, check_same_thread=False, isolation_level=None)
    db.execute(f"PRAGMA mmap_size={MMAP_BYTES if mmap else 0}")
    return db


def _decode_block(data: bytes, checksum: int, where: str) -> Block:
    if block_checksum(data) != checksum:
        raise FormatError(f"block checksum mismatch in {where}")
    return decode_entries(data)


class Run:
    """A read handle on one run; reference counted so compaction never deletes a run mid-read."""

    def __init__(self, path: Path, index: list[bytes] | None = None) -> None:
        """``index``: every block's first key (:attr:`RunSummary.index`) if the caller wrote the run:
        reading it from the file touches every page of it."""
        self.path = path
        self._db = _connect_immutable(path)
        self._lock = threading.Lock()
        meta = check_format(path, self._db)
        self.entries = int(meta["entries"])
        self.min_key = bytes(meta["min_key"])
        self.max_key = bytes(meta["max_key"])
        self.filter = KeyFilter.from_bytes(meta["filter"], int(meta["filter_partition"]))
        self.block_entries = int(meta["block_entries"])
        self.key_width = int(meta["key_width"])
        if index is None:
            index = [bytes(row[0]) for row in self._db.execute("SELECT first_key FROM blocks ORDER BY id")]
        self.index = index
        self._refs = 1
        self._obsolete = False

    def get(self, key: bytes) -> Value | object:
        """The value, ``None`` (a tombstone here) or ``MISSING``: range, then filter, then one block."""
        if key < self.min_key or key > self.max_key:
            return MISSING
        slot = bisect_right(self.index, key) - 1
        if slot < 0 or not self.filter.may_contain(key, slot * self.block_entries):
            return MISSING
        with self._lock:
            row = self._db.execute("SELECT data, checksum FROM blocks WHERE id = ?", (slot,)).fetchone()
        data, checksum = row
        if block_checksum(data) != checksum:
            raise FormatError(f"block checksum mismatch in {self.path}")
        found, value = find_entry(data, key)
        return value if found else MISSING

    def get_many(self, keys: Sequence[bytes]) -> list[Value | object]:
        """:meth:`get` of each key, in order, reading and checking each block once: the keys of a
        batch lookup (an index drain reads thousands) fall by the dozen into the same blocks."""
        out: list[Value | object] = [MISSING] * len(keys)
        by_slot: dict[int, list[int]] = {}
        for position, key in enumerate(keys):
            if key < self.min_key or key > self.max_key:
                continue
            slot = bisect_right(self.index, key) - 1
            if slot >= 0 and self.filter.may_contain(key, slot * self.block_entries):
                by_slot.setdefault(slot, []).append(position)
        for slot, positions in by_slot.items():
            with self._lock:
                data, checksum = self._db.execute("SELECT data, checksum FROM blocks WHERE id = ?", (slot,)).fetchone()
            if block_checksum(data) != checksum:
                raise FormatError(f"block checksum mismatch in {self.path}")
            for position in positions:
                found, value = find_entry(data, keys[position])
                if found:
                    out[position] = value
        return out

    def range_items(self, low: bytes, high: bytes | None) -> list[tuple[bytes, Value]]:
        """Entries with ``low <= key < high`` in key order (tombstones included)."""
        if not self.index or low > self.max_key or (high is not None and high <= self.min_key):
            return []
        slot = max(bisect_right(self.index, low) - 1, 0)
        stop = len(self.index) if high is None else bisect_left(self.index, high)
        with self._lock:
            rows = self._db.execute(
                "SELECT data, checksum FROM blocks WHERE id >= ? AND id < ? ORDER BY id", (slot, stop)
            ).fetchall()
        found: list[tuple[bytes, Value]] = []
        for data, checksum in rows:
            keys, values = _decode_block(data, checksum, str(self.path))
            start = bisect_left(keys, low)
            stop = len(keys) if high is None else bisect_left(keys, high, start)
            found.extend(zip(keys[start:stop], values[start:stop], strict=True))
        return found

    def blocks(self, *, blocks_per_fetch: int = 16) -> Iterator[Block]:
        """Every block in key order, read through this handle (pin the run while iterating).

        Unlike :func:`iter_blocks`, which opens the file by name, this reads a run that was deleted
        after the handle was opened: a reader in another process cannot stop the writer's
        compactions from deleting the runs it has pinned, only keep the files open.
        """
        for start in range(0, len(self.index), blocks_per_fetch):
            with self._lock:
                rows = self._db.execute(
                    "SELECT data, checksum FROM blocks WHERE id >= ? AND id < ? ORDER BY id",
                    (start, start + blocks_per_fetch),
                ).fetchall()
            for data, checksum in rows:
                yield _decode_block(data, checksum, str(self.path))

    def acquire(self) -> None:
        with self._lock:
            self._refs += 1

    def release(self) -> None:
        """Drop a reference; the last one closes the handle and, if obsolete, deletes the file."""
        with self._lock:
            self._refs -= 1
            last = self._refs == 0
        if last:
            self._db.close()
            if self._obsolete:
                self.path.unlink(missing_ok=True)

    def retire(self, *, delete: bool) -> None:
        """Drop the manifest's reference (replaced by a compaction); ``delete`` unlinks when unread.

        Only the writer deletes: a reader in another process passes ``delete=False``.
        """
        self._obsolete = delete
        self.release()


def iter_blocks(path: Path, *, blocks_per_fetch: int = 16) -> Iterator[Block]:
    """Every block of a run in key order, on a private connection opened by name (for the writer's
    merges: only the writer deletes runs, and not one it is reading).  Readers use :meth:`Run.blocks`."""
    db = _connect_immutable(path)
    try:
        check_format(path, db)
        cursor = db.execute("SELECT data, checksum FROM blocks ORDER BY id")
        while rows := cursor.fetchmany(blocks_per_fetch):
            for data, checksum in rows:
                yield _decode_block(data, checksum, str(path))
    finally:
        db.close()


def iter_columns(
    path: Path, width: int, *, entries_per_chunk: int = 32768, drop_cache: bool = False
) -> Iterator[Columns]:
    """Every entry of a run whose keys are all ``width`` bytes, in key order, as chunks of columns.

    ``drop_cache`` (a merge's inputs, deleted once it is done): read without a memory map, and drop
    the pages read from the page cache as the read goes (:class:`_ReadDropper`), so that the
    merge's output is written into the pages its inputs free rather than into fresh ones.
    """
    db = _connect_immutable(path, mmap=not drop_cache)
    dropper = _ReadDropper(path, db) if drop_cache and hasattr(os, "posix_fadvise") else None
    try:
        check_format(path, db)
        (block_entries,) = db.execute("SELECT value FROM meta WHERE name = 'block_entries'").fetchone()
        cursor = db.execute("SELECT data, checksum FROM blocks ORDER BY id")
        where = str(path)
        while rows := cursor.fetchmany(max(1, entries_per_chunk // int(block_entries))):
            for data, checksum in rows:
                if block_checksum(data) != checksum:
                    raise FormatError(f"block checksum mismatch in {where}")
            if dropper is not None:
                dropper.advance(len(rows))
            yield decode_blocks([data for data, _ in rows], width)
    finally:
        db.close()
        if dropper is not None:
            dropper.close()


DROP_READ_BYTES = 8 << 20
"""A merge drops the pages of an input it has read every this many bytes (:class:`_ReadDropper`)."""
_DROP_READ_MARGIN = 2 << 20


class _ReadDropper:
    """Drops the pages of a run read in block order from the page cache, behind the reader.

    Why: on a VM whose memory is backed lazily (free pages reported to the host), a page the guest
    has not used lately costs a host fault on its first touch: buffered writes into fresh page
    cache measured ~2.5-3 s of kernel CPU per GB against ~0.3 s/GB into recycled pages.  A merge
    writes a run as large as its inputs, which it deletes at the end; dropping the inputs' pages as
    it goes hands them to the output, so the page cache does not grow by the output's size first
    (and shrink by the inputs' at the end, too late for those pages to be reused while still warm).
    A page dropped too early is only read again from disk: pages are never dropped while dirty or
    mapped, and the run is immutable.

    Blocks are appended in ``id`` order, so the pages behind the reader are about the file's first
    ``size * blocks_read / blocks`` bytes; ``_DROP_READ_MARGIN`` keeps the B-tree's interior pages
    near the reader (which SQLite's own cache holds anyway).
    """

    def __init__(self, path: Path, db: sqlite3.Connection) -> None:
        self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        (last,) = db.execute("SELECT max(id) FROM blocks").fetchone()
        self._blocks = 0 if last is None else int(last) + 1
        self._read = 0
        self._dropped = 0

    def advance(self, blocks: int) -> None:
        self._read += blocks
        if not self._blocks:
            return
        behind = self._size * self._read // self._blocks - _DROP_READ_MARGIN
        if behind - self._dropped >= DROP_READ_BYTES:
            os.posix_fadvise(self._fd, self._dropped, behind - self._dropped, os.POSIX_FADV_DONTNEED)
            self._dropped = behind

    def close(self) -> None:
        os.close(self._fd)


def verify_run(path: Path) -> list[str]:
    """Problems found by SQLite's integrity check, block checksums, ordering and counts ([] = ok)."""
    problems: list[str] = []
    db = _connect_immutable(path)
    try:
        for (line,) in db.execute("PRAGMA integrity_check"):
            if line != "ok":
                problems.append(f"sqlite: {line}")
        meta = check_format(path, db)
        entries = 0
        previous: bytes | None = None
        rows = db.execute("SELECT first_key, last_key, n, checksum, data FROM blocks ORDER BY id")
        for first_key, last_key, n, checksum, data in rows:
            try:
                keys, _ = _decode_block(data, checksum, str(path))
            except FormatError as exc:
                problems.append(str(exc))
                continue
            if len(keys) != n or keys[0] != first_key or keys[-1] != last_key:
                problems.append(f"block {first_key.hex()} header disagrees with its data")
            width = meta.get("key_width")
            if width and any(len(key) != width for key in keys):
                problems.append(f"block {first_key.hex()} holds a key not {width} bytes wide")
            if keys != sorted(keys) or (previous is not None and keys[0] <= previous):
                problems.append(f"block {first_key.hex()} out of order")
            previous = keys[-1]
            entries += len(keys)
        if entries != meta.get("entries"):
            problems.append(f"meta says {meta.get('entries')} entries, blocks hold {entries}")
    except (sqlite3.DatabaseError, FormatError) as exc:
        problems.append(f"{type(exc).__name__}: {exc}")
    finally:
        db.close()
    return problems
