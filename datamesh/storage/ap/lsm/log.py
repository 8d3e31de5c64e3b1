"""The write-ahead log: checksummed records, group commit, an fsync policy, torn-tail repair.

Every ``put_many`` / ``delete_many`` batch is one record, so a batch is durable (or lost) as a
whole: recovery replays whole records and never half of one.  Record layout::

    u32 payload length | u32 crc32(sequence || payload) | u64 sequence | payload

Group commit: appends happen under the shard lock (they fix the order of batches), the fsync does
not.  A writer that finds its record already covered by another thread's fsync returns at once, so
N concurrent writers share one ``fdatasync`` instead of queueing N of them.

A torn tail (a record cut short, or whose checksum fails, because the process or the machine died
mid-write) is detected on replay and cut off with ``ftruncate``: it was never acknowledged, since
acknowledgement follows the write (and, under ``FsyncPolicy.ALWAYS``, the fsync).
"""

from __future__ import annotations

import os
import struct
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

HEADER = struct.Struct("<IIQ")
_SEQ = struct.Struct("<Q")
_CLOSED = 2**64  # covers every sequence: ``sync`` on a closed (hence fully synced) log returns at once


class FsyncPolicy(StrEnum):
    """When a log append reaches stable storage before ``put_many`` returns."""

    ALWAYS = "always"  # fdatasync before acknowledging (shared by concurrent writers): RPO 0
    INTERVAL = "interval"  # fdatasync at most every ``fsync_interval_s``: a crash of the machine loses that window
    NEVER = "never"  # leave it to the OS: survives a killed process, not a power cut


def record_header(sequence: int, payload: bytes | Sequence[bytes]) -> bytes:
    """The header of a record whose payload is ``payload`` or, given a sequence, its parts joined."""
    parts = (payload,) if isinstance(payload, bytes) else payload
    crc = zlib.crc32(_SEQ.pack(sequence))
    for part in parts:
        crc = zlib.crc32(part, crc)
    return HEADER.pack(sum(map(len, parts)), crc, sequence)


def record_bytes(sequence: int, payload: bytes) -> bytes:
    """One framed record (exposed so tests can write torn tails of real records)."""
    return record_header(sequence, payload) + payload


class LogWriter:
    """Appends records to one log file; thread-safe ``sync`` implements group commit."""

    def __init__(self, path: Path, *, policy: FsyncPolicy, fsync_interval_s: float) -> None:
        self.path = path
        self.policy = policy
        self._interval = fsync_interval_s
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._sync_lock = threading.Lock()
        self._written = 0  # highest sequence fully written to the file
        self._synced = 0  # highest sequence known to be on stable storage
        self._last_sync = time.monotonic()
        self.bytes_written = os.fstat(self._fd).st_size

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

    def sync_all(self, sequence: int | None = None) -> None:
        """fdatasync now unless ``sequence`` is already covered by a sync that finished meanwhile."""
        with self._sync_lock:
            if sequence is not None and self._synced >= sequence:
                return
            if self._fd < 0:
                return
            target = self._written
            os.fdatasync(self._fd)
            self._synced = target
            self._last_sync = time.monotonic()

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


def replay(path: Path, *, repair: bool = True) -> Replay:
    """Read every intact record; cut the file after the last one when ``repair`` (a torn tail).

    Stops at the first record whose header or payload is short or whose checksum fails: records
    are written strictly in order, so nothing after a torn record was acknowledged either.
    """
    data = path.read_bytes()
    result = Replay()
    offset = 0
    while offset < len(data):
        if offset + HEADER.size > len(data):
            result.reason = "short header"
            break
        length, crc, sequence = HEADER.unpack_from(data, offset)
        end = offset + HEADER.size + length
        if end > len(data):
            result.reason = "short payload"
            break
        payload = data[offset + HEADER.size : end]
        if zlib.crc32(payload, zlib.crc32(_SEQ.pack(sequence))) != crc:
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
