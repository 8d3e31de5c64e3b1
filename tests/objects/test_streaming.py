"""Streaming: a 200 MiB payload goes in and out with memory growth far below its size."""

from __future__ import annotations

import hashlib
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from datamesh.core.types import ContentHash
from datamesh.storage.objects.base import ObjectStore
from datamesh.storage.objects.config import DEFAULT_S3_PART_BYTES
from datamesh.storage.objects.filesystem import FilesystemObjectStore

from .conftest import MotoServer, make_s3_store

MiB = 1024 * 1024
PAYLOAD_BYTES = 200 * MiB
#: Allowed growth: a few parts and chunks in flight, a small fraction of the payload.
MAX_GROWTH_BYTES = 48 * MiB


def generated(total: int, chunk: int = MiB) -> Iterator[bytes]:
    """A deterministic, non-repeating-per-chunk payload made on the fly (never held whole)."""
    block = bytes(range(256)) * (chunk // 256)
    for i in range(total // chunk):
        yield i.to_bytes(8, "big") + block[8:]


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


class Peak:
    """Samples this process's RSS every few milliseconds and tracks Python allocations."""

    def __init__(self) -> None:
        self.base_rss = 0
        self.peak_rss = 0
        self._stop = threading.Event()

    def measure(self, fn: Callable[[], object]) -> tuple[int, int]:
        """Run ``fn``; return (peak RSS growth, peak traced Python allocation growth) in bytes."""
        self.base_rss = self.peak_rss = rss_bytes()
        sampler = threading.Thread(target=self._sample, daemon=True)
        tracemalloc.start()
        base_traced = tracemalloc.get_traced_memory()[0]
        sampler.start()
        try:
            fn()
        finally:
            self._stop.set()
            sampler.join()
            peak_traced = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        return self.peak_rss - self.base_rss, peak_traced - base_traced

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_rss = max(self.peak_rss, rss_bytes())
            time.sleep(0.005)


@pytest.fixture
def big_store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore[Any]]:
    made: ObjectStore[Any]
    if backend == "fs":
        made = FilesystemObjectStore(tmp_path / "objects")
    else:
        moto: MotoServer = request.getfixturevalue("moto")
        made = make_s3_store(moto, request.getfixturevalue("bucket"), part_bytes=DEFAULT_S3_PART_BYTES)
    yield made
    made.close()


def test_200_mib_stream_in_and_out_with_bounded_memory(big_store: ObjectStore[Any]) -> None:
    sha = hashlib.sha256()
    for chunk in generated(PAYLOAD_BYTES):
        sha.update(chunk)
    expected = ContentHash(sha.hexdigest())

    stored: list[Any] = []
    put_rss, put_traced = Peak().measure(lambda: stored.append(big_store.put_stream(generated(PAYLOAD_BYTES))))
    result = stored[0].unwrap()
    assert result.content_hash == expected and result.size == PAYLOAD_BYTES

    read: list[int] = []
    get_rss, get_traced = Peak().measure(lambda: read.append(big_store.verify(expected).unwrap()))
    assert read == [PAYLOAD_BYTES]

    print(
        f"\n{big_store.backend}: put_stream 200 MiB: RSS + {put_rss / MiB:.1f} MiB, traced +{put_traced / MiB:.1f} MiB;"
        f" verify: RSS +{get_rss / MiB:.1f} MiB, traced +{get_traced / MiB:.1f} MiB"
    )
    for growth in (put_rss, put_traced, get_rss, get_traced):
        assert growth < MAX_GROWTH_BYTES
