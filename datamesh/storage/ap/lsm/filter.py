"""A membership filter for a run: CRC-32 fingerprints of its keys, sorted within partitions.

It plays the part of a bloom filter (skip a run that cannot hold a key) but is built at C speed:
``map(zlib.crc32, keys)`` and sorts of small slices, where a bloom filter in pure Python would set
k bits per key in a Python loop and cost more than the flush itself.

The keys of a run are cut, in key order, into partitions of ``partition`` consecutive keys (a whole
number of blocks), and each partition's fingerprints are sorted on their own.  A lookup already
knows from the sparse index which block (hence which partition) could hold the key, so it bisects
only that partition: the false-positive rate is about ``partition / 2**32`` (1e-6 for 4096) whatever
the run's size, and building never sorts more than one partition at a time, so a big compaction
does not hold the GIL for seconds (which would stall writers).  The price is 32 bits per key.
"""

from __future__ import annotations

import sys
import zlib
from array import array
from bisect import bisect_left

DEFAULT_PARTITION = 4096


class KeyFilter:
    """Answers "may this run hold the key?" with no false negatives."""

    __slots__ = ("_fingerprints", "partition")

    def __init__(self, fingerprints: array[int], partition: int) -> None:
        self._fingerprints = fingerprints
        self.partition = partition

    def may_contain(self, key: bytes, ordinal: int) -> bool:
        """``ordinal``: the position of any key of the key's block (the first, say) in the run."""
        start = ordinal - ordinal % self.partition
        stop = min(start + self.partition, len(self._fingerprints))
        fingerprint = zlib.crc32(key)
        index = bisect_left(self._fingerprints, fingerprint, start, stop)
        return index < stop and self._fingerprints[index] == fingerprint

    def to_bytes(self) -> bytes:
        data = array("I", self._fingerprints)
        if sys.byteorder == "big":  # pragma: no cover
            data.byteswap()
        return data.tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes, partition: int) -> KeyFilter:
        data = array("I")
        data.frombytes(blob)
        if sys.byteorder == "big":  # pragma: no cover
            data.byteswap()
        return cls(data, partition)

    def __len__(self) -> int:
        return len(self._fingerprints)


class FilterBuilder:
    """Collects fingerprints of keys given in run order, sorting each partition as it fills."""

    __slots__ = ("_done", "_pending", "partition")

    def __init__(self, partition: int = DEFAULT_PARTITION) -> None:
        self.partition = partition
        self._done = array("I")
        self._pending = array("I")

    def add(self, keys: list[bytes]) -> None:
        self._pending.extend(map(zlib.crc32, keys))
        size = self.partition
        if len(self._pending) >= size:
            full = len(self._pending) - len(self._pending) % size
            for start in range(0, full, size):
                self._done.extend(sorted(self._pending[start : start + size]))
            self._pending = self._pending[full:]

    def finish(self) -> KeyFilter:
        self._done.extend(sorted(self._pending))
        self._pending = array("I")
        return KeyFilter(self._done, self.partition)
