"""A membership filter for a run: the sorted CRC-32 fingerprints of its keys.

It plays the part of a bloom filter (skip a run that cannot hold a key) but is built at C speed:
``map(zlib.crc32, keys)`` and one sort, where a bloom filter in pure Python would set k bits per key
in a Python loop and cost more than the flush itself.  The price is 32 bits per key (a 10-bit bloom
filter is smaller) and a false-positive rate of about ``n / 2**32`` per lookup for a run of ``n`` keys:
0.02% at a million keys, 0.6% at 25 million.  A lookup is one CRC and one bisect.
"""

from __future__ import annotations

import sys
import zlib
from array import array
from bisect import bisect_left
from collections.abc import Iterable


class KeyFilter:
    """Answers "may this run hold the key?" with no false negatives."""

    __slots__ = ("_fingerprints",)

    def __init__(self, fingerprints: array[int]) -> None:
        self._fingerprints = fingerprints

    @classmethod
    def build(cls, keys: Iterable[bytes]) -> KeyFilter:
        return cls.from_fingerprints(array("I", map(zlib.crc32, keys)))

    @classmethod
    def from_fingerprints(cls, fingerprints: array[int]) -> KeyFilter:
        """From the unsorted ``zlib.crc32`` of every key (collected while a run is written)."""
        return cls(array("I", sorted(fingerprints)))

    def may_contain(self, key: bytes) -> bool:
        fingerprint = zlib.crc32(key)
        fingerprints = self._fingerprints
        index = bisect_left(fingerprints, fingerprint)
        return index < len(fingerprints) and fingerprints[index] == fingerprint

    def to_bytes(self) -> bytes:
        data = array("I", self._fingerprints)
        if sys.byteorder == "big":  # pragma: no cover
            data.byteswap()
        return data.tobytes()

    @classmethod
    def from_bytes(cls, blob: bytes) -> KeyFilter:
        data = array("I")
        data.frombytes(blob)
        if sys.byteorder == "big":  # pragma: no cover
            data.byteswap()
        return cls(data)

    def __len__(self) -> int:
        return len(self._fingerprints)
