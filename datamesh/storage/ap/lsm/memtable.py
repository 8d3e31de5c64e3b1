"""The memtable: the newest writes, in a dict, sorted only when flushed or scanned.

A dict is the fastest map CPython has (``dict.update(zip(keys, values))`` runs in C at millions of
entries per second); a sorted structure would cost a Python-level insertion per key.  Order is paid
for once per flush with one ``sorted`` (timsort in C), and for prefix scans with a sorted key list
cached until the next insert of a new key.  When every key has one width, a flush sorts the keys
as one numpy array instead (:meth:`Memtable.flush_chunks`, see :mod:`.columns`).
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

import numpy as np

from datamesh.storage.ap.lsm.columns import Columns, from_lists
from datamesh.storage.ap.lsm.format import Value

MISSING: object = object()
"""Returned by lookups when a source knows nothing of a key (unlike ``None``, a tombstone)."""


class Memtable:
    """Entries of one log file; ``log_number`` says which log makes them durable."""

    __slots__ = ("_sorted", "approx_bytes", "created", "entries", "log_number", "max_seq")

    def __init__(self, log_number: int) -> None:
        self.entries: dict[bytes, Value] = {}
        self.approx_bytes = 0
        self.log_number = log_number
        self.max_seq = 0
        self.created = time.monotonic()
        self._sorted: list[bytes] | None = None

    def apply(self, keys: Sequence[bytes], values: Sequence[Value], sequence: int, payload_bytes: int) -> None:
        """Insert one batch (the caller holds the shard lock, so a batch lands as a whole)."""
        before = len(self.entries)
        self.entries.update(zip(keys, values, strict=True))
        if len(self.entries) != before or self._sorted is None:
            self._sorted = None
        self.approx_bytes += payload_bytes
        self.max_seq = sequence

    def get(self, key: bytes) -> Value | object:
        return self.entries.get(key, MISSING)

    def sorted_keys(self) -> list[bytes]:
        if self._sorted is None:
            self._sorted = sorted(self.entries)
        return self._sorted

    def range_items(self, low: bytes, high: bytes | None) -> list[tuple[bytes, Value]]:
        """Entries with ``low <= key < high`` in key order (tombstones included)."""
        keys = self.sorted_keys()
        start = bisect_left(keys, low)
        stop = len(keys) if high is None else bisect_left(keys, high, start)
        entries = self.entries
        return [(key, entries[key]) for key in keys[start:stop]]

    def sorted_chunks(self, size: int = 65536) -> Iterator[tuple[list[bytes], list[Value]]]:
        """Every entry in key order, in chunks of ``size`` (the input of a flush)."""
        keys = sorted(self.entries)
        for start in range(0, len(keys), size):
            chunk = keys[start : start + size]
            yield chunk, list(map(self.entries.__getitem__, chunk))

    def flush_chunks(self, size: int = 65536) -> Iterator[Columns | tuple[list[bytes], list[Value]]]:
        """Every entry in key order, in chunks of ``size``: columns if the keys share one width."""
        columns = from_lists(list(self.entries), list(self.entries.values()))
        if columns is None:
            yield from self.sorted_chunks(size)
            return
        ordered = columns.take(np.argsort(columns.keys, kind="stable"))
        for start in range(0, len(ordered), size):
            yield ordered.slice(start, min(start + size, len(ordered)))

    def __len__(self) -> int:
        return len(self.entries)
