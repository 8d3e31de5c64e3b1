"""The memtable: the newest writes, appended as numpy columns, sorted only when read or flushed.

Two representations, one per memtable:

* **columns** (every key so far of one width, the AP tier's case): each batch is appended as a
  :class:`~.columns.Columns` decoded straight from its log payload (a few slices, no Python object
  per entry), like RocksDB's vector memtable.  Order is paid for when needed: a read sorts each
  batch it has not sorted yet on its own (so a read after a write sorts one batch, not the
  memtable) and binary-searches every batch, newest first; a flush sorts all the entries once with
  one stable ``argsort`` (batches oldest first, the last write of a key wins).  Measured on
  10,000-entry batches of 16+200 bytes: ~0.05 us per entry to append against ~0.35 us for the
  ``dict.update`` of the dict memtable, and a flush sorts keys as one array instead of a list of
  ``bytes``.
* **dict** (keys of several widths): ``dict.update(zip(keys, values))`` runs in C; order costs one
  ``sorted`` per flush or scan.  A columns memtable that receives a key of another width turns
  into a dict one (once; its batches are replayed into the dict).

A point read costs one binary search per batch (~70 per full memtable), which a dict would not.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from datamesh.storage.ap.lsm.columns import (
    Columns,
    Scratch,
    decode_blocks,
    from_lists,
    from_parts,
    sort_unique,
    stable_key_order,
    unique_order,
)
from datamesh.storage.ap.lsm.format import FormatError, Value

MISSING: object = object()
"""Returned by lookups when a source knows nothing of a key (unlike ``None``, a tombstone)."""


class Memtable:
    """Entries of one log file; ``log_number`` says which log makes them durable."""

    __slots__ = (
        "_batches",
        "_dict",
        "_indexes",
        "_sorted",
        "_view",
        "applied",
        "approx_bytes",
        "created",
        "log_number",
        "max_seq",
    )

    def __init__(self, log_number: int) -> None:
        self._batches: list[Columns] = []  # columns mode: batches oldest first
        self._indexes: list[_BatchIndex] = []  # sorted keys of the first len(_indexes) batches
        self._view: tuple[int, Columns | None] = (0, None)  # (batches folded in, sorted unique entries)
        self._dict: dict[bytes, Value] | None = None  # dict mode
        self._sorted: list[bytes] | None = None
        self.approx_bytes = 0
        self.applied = 0
        self.log_number = log_number
        self.max_seq = 0
        self.created = time.monotonic()

    # -- writes -------------------------------------------------------------------------------

    def apply(self, keys: Sequence[bytes], values: Sequence[Value], sequence: int, payload_bytes: int) -> None:
        """Insert one batch given as lists (the caller holds the shard lock: a batch lands whole)."""
        columns = None if self._dict is not None else from_lists(keys, values)
        self._add(columns, keys, values, sequence, payload_bytes)

    def apply_payload(self, payload: bytes, keys: Sequence[bytes], values: Sequence[Value], sequence: int) -> None:
        """Insert one batch, decoding its encoded ``payload`` (:mod:`.format`) into columns if it can."""
        columns = None
        if self._dict is None and keys and keys[0]:
            try:
                columns = decode_blocks([payload], len(keys[0]))
            except FormatError:  # keys of several widths
                columns = None
        self._add(columns, keys, values, sequence, len(payload))

    def apply_parts(
        self, parts: Sequence[bytes], keys: Sequence[bytes], values: Sequence[Value], sequence: int
    ) -> None:
        """Insert one batch given as :func:`.format.entry_parts`, its columns made of the parts."""
        columns = None
        if self._dict is None and keys and keys[0]:
            columns = from_parts(parts, len(keys[0]))
        self._add(columns, keys, values, sequence, sum(map(len, parts)))

    def _add(
        self, columns: Columns | None, keys: Sequence[bytes], values: Sequence[Value], sequence: int, size: int
    ) -> None:
        if not keys:
            self.max_seq = sequence
            return
        if columns is not None and self._batches and columns.width != self._batches[0].width:
            columns = None
        if columns is None:
            entries = self._to_dict()
            before = len(entries)
            entries.update(zip(keys, values, strict=True))
            if len(entries) != before:
                self._sorted = None
        else:
            self._batches.append(columns)
        self.applied += len(keys)
        self.approx_bytes += size
        self.max_seq = sequence

    def _to_dict(self) -> dict[bytes, Value]:
        if self._dict is None:
            entries: dict[bytes, Value] = {}
            for batch in self._batches:
                entries.update(zip(*batch.to_lists(), strict=True))
            self._dict, self._batches, self._indexes, self._view = entries, [], [], (0, None)
        return self._dict

    # -- reads --------------------------------------------------------------------------------

    def _sorted_view(self) -> Columns | None:
        """Columns mode: every entry, one per key (the newest), in key order; cached until a write."""
        folded, view = self._view
        batches = self._batches
        if folded == len(batches):
            return view
        parts = batches[folded:] if view is None else [view, *batches[folded:]]
        view = sort_unique(parts, drop_tombstones=False, newest_last=True)
        self._view = (len(batches), view)
        return view

    def _batch_indexes(self) -> list[_BatchIndex]:
        """Columns mode: each batch's keys sorted (computed once per batch, at its first read)."""
        indexes = self._indexes
        for batch in self._batches[len(indexes) :]:
            order = stable_key_order(batch.keys)
            indexes.append(_BatchIndex(batch, batch.keys[order], order, batch.value_offsets()))
        return indexes

    def get_many(self, keys: Sequence[bytes]) -> list[Value | object]:
        """For each key its value, ``None`` (a tombstone) or ``MISSING``."""
        if self._dict is not None:
            entries = self._dict
            return [entries.get(key, MISSING) for key in keys]
        found: list[Value | object] = [MISSING] * len(keys)
        if not self._batches or not keys:
            return found
        width = self._batches[0].width
        asked = [index for index, key in enumerate(keys) if len(key) == width]
        if not asked:
            return found
        wanted = np.frombuffer(b"".join(keys[index] for index in asked), dtype=f"S{width}")
        pending = np.arange(len(asked))
        for index in reversed(self._batch_indexes()):  # newest batch first
            if not len(pending):
                break
            slots = np.searchsorted(index.keys, wanted[pending], side="right") - 1  # a batch's last write wins
            hit = (slots >= 0) & (index.keys[np.maximum(slots, 0)] == wanted[pending])
            if not bool(hit.any()):
                continue
            rows = index.order[slots[hit]]
            batch = index.batch
            data = batch.values
            for asked_at, row, tombstone in zip(
                pending[hit].tolist(), rows.tolist(), batch.tombstones[rows].tolist(), strict=True
            ):
                found[asked[asked_at]] = (
                    None if tombstone else data[index.offsets[row] : index.offsets[row + 1]].tobytes()
                )
            pending = pending[~hit]
        return found

    def range_items(self, low: bytes, high: bytes | None) -> list[tuple[bytes, Value]]:
        """Entries with ``low <= key < high`` in key order (tombstones included)."""
        if self._dict is not None:
            if self._sorted is None:
                self._sorted = sorted(self._dict)
            keys = self._sorted
            start = bisect_left(keys, low)
            stop = len(keys) if high is None else bisect_left(keys, high, start)
            entries = self._dict
            return [(key, entries[key]) for key in keys[start:stop]]
        merged: dict[bytes, Value] = {}
        for index in reversed(self._batch_indexes()):  # newest batch first: setdefault keeps its entry
            width = index.batch.width
            start = _bound(index.keys, width, low)
            stop = len(index.keys) if high is None else _bound(index.keys, width, high)
            if start >= stop:
                continue
            rows = np.sort(index.order[start:stop])[::-1]  # within a batch, the later write first
            keys, values = index.batch.take(rows).to_lists()
            for key, value in zip(keys, values, strict=True):
                merged.setdefault(key, value)
        return sorted(merged.items())

    def sorted_chunks(self, size: int = 65536) -> Iterator[tuple[list[bytes], list[Value]]]:
        """Every entry in key order, in chunks of ``size``, as lists."""
        for chunk in self.flush_chunks(size):
            yield chunk.to_lists() if isinstance(chunk, Columns) else chunk

    def flush_chunks(
        self, size: int = 65536, *, scratch: Scratch | None = None
    ) -> Iterator[Columns | tuple[list[bytes], list[Value]]]:
        """Every entry in key order, in chunks of ``size``: columns unless the keys differ in width.

        With ``scratch`` the batches are concatenated and the chunks gathered into its buffers: a
        chunk is valid only until the next is taken, as :func:`~.run.write_run` consumes them.
        """
        if self._dict is not None:
            entries = self._dict
            keys = sorted(entries)
            for start in range(0, len(keys), size):
                chunk = keys[start : start + size]
                yield chunk, list(map(entries.__getitem__, chunk))
            return
        folded, view = self._view
        if folded != len(self._batches) and view is None:  # nothing sorted yet: gather chunk by chunk
            columns, keep = unique_order(self._batches, drop_tombstones=False, newest_last=True, scratch=scratch)
            for start in range(0, len(keep), size):
                yield columns.take(keep[start : start + size], scratch)
            return
        view = self._sorted_view()
        if view is None:
            return
        for start in range(0, len(view), size):
            yield view.slice(start, min(start + size, len(view)))

    def __len__(self) -> int:
        """Entries applied (a key written twice counts twice in columns mode); 0 means empty."""
        return len(self._dict) if self._dict is not None else self.applied


class _BatchIndex:
    """One batch of a columns memtable with its keys sorted: ``keys[i]`` is ``batch`` row ``order[i]``."""

    __slots__ = ("batch", "keys", "offsets", "order")

    def __init__(
        self,
        batch: Columns,
        keys: npt.NDArray[np.generic],
        order: npt.NDArray[np.intp],
        offsets: npt.NDArray[np.int64],
    ) -> None:
        self.batch = batch
        self.keys = keys
        self.order = order
        self.offsets = offsets


def _bound(keys: npt.NDArray[np.generic], width: int, key: bytes) -> int:
    """Index of the first of the sorted ``keys`` ``>= key`` (``key`` of any width, compared as
    ``bytes`` compare)."""
    if len(key) == width:
        return int(np.searchsorted(keys, np.frombuffer(key, dtype=keys.dtype))[0])
    if len(key) < width:
        # The keys >= key are those whose first len(key) bytes are >= key (a longer key with equal
        # prefix is greater), i.e. >= key padded with zero bytes.
        padded = key + b"\x00" * (width - len(key))
        return int(np.searchsorted(keys, np.frombuffer(padded, dtype=keys.dtype))[0])
    # A longer key: the keys > key[:width] come after it, and key[:width] itself comes before it.
    return int(np.searchsorted(keys, np.frombuffer(key[:width], dtype=keys.dtype), side="right")[0])
