"""The write-ahead log: checksummed records, group commit, an fsync policy, torn-tail repair.

Every ``put_many`` / ``delete_many`` batch is one record, so a batch is durable (or lost) as a
whole: recovery replays whole records and never half of one.  Layout (log format 2)::

    file:   b"DMLSMLOG" | u32 log format | record | record | ...
    record: u32 payload length | u64 xxh3_64(payload, seed=sequence) | u64 sequence | payload

The file header is written when the log is created, before any record.  Log format 1 had no file
header and checksummed ``sequence || payload`` with ``zlib.crc32`` (~2-4 GB/s, ~0.05 us of the
writer's CPU per 200-byte row); ``xxh3_64`` runs at ~27-50 GB/s.  A log without the header (format
1) or of another format is refused with an error naming both versions, never replayed as a torn
tail (which would cut acknowledged batches); a file shorter than the header and a prefix of it
was torn while being created, before any record, and counts as an empty log.

Group commit: appends happen under the shard lock (they fix the order of batches), the fsync does
not.  A writer that finds its record already covered by another thread's fsync returns at once, so
N concurrent writers share one ``fdatasync`` instead of queueing N of them.

A torn tail (a record cut short, or whose checksum fails, because the process or the machine died
mid-write) is detected on replay and cut off with ``ftruncate``: it was never acknowledged, since
acknowledgement follows the write (and, under ``FsyncPolicy.ALWAYS``, the fsync).

Page cache: once a sync has made ``DROP_CACHE_BYTES`` more of the log durable, those pages are
dropped from the page cache (``POSIX_FADV_DONTNEED``; clean pages only, so nothing durable
depends on it).  The log is read only by recovery, which reads the file from disk anyway, and the
freed pages are the ones the next appends get, so the log cycles through a few MiB of page cache
instead of growing it by a memtable's worth per log.  Why it matters: on a VM whose memory is
backed lazily (free pages reported to the host, e.g. virtio-balloon free page reporting), a page
the guest has not used lately costs a host fault on first touch; measured here, buffered writes
into fresh page cache cost ~2.5-3 s of kernel CPU per GB against ~0.3 s/GB into recycled pages
(``bench/bench_lsm.py``: ~27% of the writer thread's CPU was the log's copy into the page cache).
"""

from __future__ import annotations

import os
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from xxhash import xxh3_64, xxh3_64_intdigest

from datamesh.storage.ap.lsm.format import FormatError

LOG_FORMAT = 2
MAGIC = b"DMLSMLOG"
FILE_HEADER = MAGIC + struct.pack("<I", LOG_FORMAT)
HEADER = struct.Struct("<IQQ")
DROP_CACHE_BYTES = 8 << 20
"""Durable log bytes after which a sync drops them from the page cache (see the module docstring)."""
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_CLOSED = 2**64  # covers every sequence: ``sync`` on a closed (hence fully synced) log returns at once


class FsyncPolicy(StrEnum):
    """When a log append reaches stable storage before ``put_many`` returns."""

    ALWAYS = "always"  # fdatasync before acknowledging (shared by concurrent writers): RPO 0
    INTERVAL = "interval"  # fdatasync at most every ``fsync_interval_s``: a crash of the machine loses that window
    NEVER = "never"  # leave it to the OS: survives a killed process, not a power cut


def record_header(sequence: int, payload: bytes | Sequence[bytes]) -> bytes:
    """The header of a record whose payload is ``payload`` or, given a sequence, its parts joined."""
    if isinstance(payload, bytes):
        return HEADER.pack(len(payload), xxh3_64_intdigest(payload, sequence), sequence)
    digest = xxh3_64(seed=sequence)
    for part in payload:
        digest.update(part)
    return HEADER.pack(sum(map(len, payload)), digest.intdigest(), sequence)


def record_bytes(sequence: int, payload: bytes) -> bytes:
    """One framed record, without the file header (exposed so tests can write torn tails of real records)."""
    return record_header(sequence, payload) + payload


class LogWriter:
    """Appends records to one log file; thread-safe ``sync`` implements group commit."""

    def __init__(self, path: Path, *, policy: FsyncPolicy, fsync_interval_s: float) -> None:
        self.path = path
        self.policy = policy
        self._interval = fsync_interval_s
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if os.fstat(self._fd).st_size == 0:
            os.write(self._fd, FILE_HEADER)  # durable with the first record's fdatasync
        self._sync_lock = threading.Lock()
        self._written = 0  # highest sequence fully written to the file
        self._synced = 0  # highest sequence known to be on stable storage
        self._last_sync = time.monotonic()
        self.bytes_written = os.fstat(self._fd).st_size
        self._dropped = 0  # the page cache holds no page of the log before this offset

    def append(self, sequence: int, payload: bytes | Sequence[bytes]) -> None:
        """Write one record (its payload whole or as parts to be joined); the caller serialises
        appends (the shard lock) so order is log order."""
        parts = [payload] if isinstance(payload, bytes) else list(payload)
        header = record_header(sequence, parts)
        size = len(header) + sum(map(len, parts))
        done = os.writev(self._fd, [header, *parts])  # no copy of the payload into one buffer
        if done < size:  # a short write: finish it from where it stopped
            view = memoryview(b"".join([header, *parts]))[done:]
            while view:
                view = view[os.write(self._fd, view) :]
        self.bytes_written += size
        self._written = sequence

    def sync(self, sequence: int) -> None:
        """Make the record ``sequence`` durable according to the policy (group commit)."""
        if self.policy is FsyncPolicy.NEVER or self._synced >= sequence:
            return
        if self.policy is FsyncPolicy.INTERVAL and time.monotonic() - self._last_sync < self._interval:
            return
        self.sync_all(sequence)

    def sync_due(self) -> bool:
        """Under ``INTERVAL``: records were written and none synced for ``fsync_interval_s``.  A writer
        that stops writing leaves its last records to the shard's flusher thread, which syncs them
        then, so the window a machine crash can lose stays bounded while the shard is idle."""
        return (
            self.policy is FsyncPolicy.INTERVAL
            and self._written > self._synced
            and time.monotonic() - self._last_sync >= self._interval
        )

    def sync_all(self, sequence: int | None = None) -> None:
        """fdatasync now unless ``sequence`` is already covered by a sync that finished meanwhile."""
        with self._sync_lock:
            if sequence is not None and self._synced >= sequence:
                return
            if self._fd < 0:
                return
            target = self._written
            durable = self.bytes_written  # read before the sync: every byte below it was written
            os.fdatasync(self._fd)
            self._synced = target
            self._last_sync = time.monotonic()
            if durable - self._dropped >= DROP_CACHE_BYTES and hasattr(os, "posix_fadvise"):
                end = durable - durable % _PAGE  # whole pages: the last one may still be appended to
                os.posix_fadvise(self._fd, self._dropped, end - self._dropped, os.POSIX_FADV_DONTNEED)
                self._dropped = end

    def close(self) -> None:
        """Sync what was written and close; later ``sync`` calls return at once."""
        with self._sync_lock:
            if self._fd < 0:
                return
            os.fdatasync(self._fd)
            self._synced = _CLOSED
            os.close(self._fd)
            self._fd = -1


@dataclass(slots=True)
class Replay:
    """What replaying one log found: the payloads in order, and what was cut off its tail."""

    records: list[tuple[int, bytes]] = field(default_factory=list)
    valid_bytes: int = 0
    truncated_bytes: int = 0
    reason: str = ""


def _check_file_header(path: Path, data: bytes) -> int:
    """Where the records start (past the file header), or :class:`FormatError` if not format 2."""
    if data.startswith(FILE_HEADER):
        return len(FILE_HEADER)
    if len(data) < len(FILE_HEADER) and FILE_HEADER.startswith(data):
        return len(data)  # torn while being created: nothing was written after the header
    if data.startswith(MAGIC) and len(data) >= len(FILE_HEADER):
        (version,) = struct.unpack_from("<I", data, len(MAGIC))
        found = f"log format {version}"
    else:
        found = "log format 1 (no file header)"
    raise FormatError(
        f"{path}: {found}, this datamesh reads log format {LOG_FORMAT} only"
        " (replay it with the datamesh that wrote it, e.g. by opening and closing the shard)"
    )


def replay(path: Path, *, repair: bool = True) -> Replay:
    """Read every intact record; cut the file after the last one when ``repair`` (a torn tail).

    Stops at the first record whose header or payload is short or whose checksum fails: records
    are written strictly in order, so nothing after a torn record was acknowledged either.
    Raises :class:`FormatError` for a log of another format (see the module docstring).
    """
    data = path.read_bytes()
    result = Replay()
    if not data:
        return result
    offset = _check_file_header(path, data)
    if offset < len(FILE_HEADER):
        offset = 0
        result.reason = "short file header"
    while offset < len(data) and not result.reason:
        if offset + HEADER.size > len(data):
            result.reason = "short header"
            break
        length, checksum, sequence = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + length
        if end > len(data):
            result.reason = "short payload"
            break
        payload = data[offset + HEADER.size : end]
        if xxh3_64_intdigest(payload, sequence) != checksum:
            result.reason = "checksum mismatch"
            break
        result.records.append((sequence, payload))
        offset = end
    result.valid_bytes = offset
    result.truncated_bytes = len(data) - offset
    if result.truncated_bytes and repair:
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, offset)
            os.fsync(fd)
        finally:
            os.close(fd)
    return result
