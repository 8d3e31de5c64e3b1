"""Streaming: a 200 MiB payload goes in and out with memory growth far below its size, through the
store itself and through an ingest."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from datamesh.core.config import DataMeshConfig
from datamesh.core.types import ContentHash, EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.storage.objects.base import ObjectStore
from datamesh.storage.objects.config import DEFAULT_S3_PART_BYTES, Location, ObjectsSettings
from datamesh.storage.objects.filesystem import FilesystemObjectStore

from .conftest import MotoServer, make_s3_store, s3_settings

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


async def test_ingesting_a_200_mib_payload_adds_far_less_memory_than_the_payload(
    backend: str, request: pytest.FixtureRequest, tmp_path: Path, cp_url: str
) -> None:
    # Given a pipeline on this backend and a caller holding a 200 MiB response (the seed API takes bytes)
    if backend == "fs":
        objects = ObjectsSettings(locations={GeoRegion.EU_WEST: Location("file", str(tmp_path / "objects"))})
    else:
        moto: MotoServer = request.getfixturevalue("moto")
        objects = ObjectsSettings(
            locations={GeoRegion.EU_WEST: Location("s3", "blobs", bucket=request.getfixturevalue("bucket"))},
            s3=s3_settings(moto.endpoint, part_bytes=DEFAULT_S3_PART_BYTES, single_put_max_bytes=DEFAULT_S3_PART_BYTES),
        )
    config = DataMeshConfig(data_dir=tmp_path / "data", cp_url=cp_url, objects=objects, indexer="off")
    payload = b"".join(generated(PAYLOAD_BYTES))
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        owner, region = EntityId.generate(), GeoRegion.EU_WEST
        turn = IngestionRequest(entity_id=owner, prompt=b"q", response=payload, geo_region=region)
        loop = asyncio.get_running_loop()
        done: list[Any] = []

        def ingest() -> None:  # measured from a thread while the event loop runs the ingest
            done.append(asyncio.run_coroutine_threadsafe(p.ingest(turn), loop).result())

        # When it is ingested
        measuring = asyncio.create_task(asyncio.to_thread(Peak().measure, ingest))
        rss, traced = await measuring
        # Then the turn committed with its payload in the object store, whole and verified
        response = done[0].unwrap()
        store = p.tiers.objects.for_region(GeoRegion.EU_WEST).unwrap()
        assert store.verify(ContentHash.of(payload)).unwrap() == PAYLOAD_BYTES
        assert (await p.get(response.conversation_id)).is_ok()
        # And the ingest added far less memory than the payload: no whole copy of it was made
        print(f"\n{backend}: ingest of 200 MiB: RSS +{rss / MiB:.1f} MiB, traced +{traced / MiB:.1f} MiB")
        assert rss < MAX_GROWTH_BYTES and traced < MAX_GROWTH_BYTES


def test_a_large_single_put_sends_its_bytes_without_a_copy(request: pytest.FixtureRequest) -> None:
    # Given an S3 store that sends up to 100 MiB as one PUT (the default), and 64 MiB held by the caller
    moto: MotoServer = request.getfixturevalue("moto")
    store = make_s3_store(moto, request.getfixturevalue("bucket"), single_put_max_bytes=100 * MiB)
    payload = b"".join(generated(64 * MiB))
    # When it is put, once, then again (the key exists: the server refuses the conditional PUT)
    first_rss, first_traced = Peak().measure(lambda: store.put(payload).unwrap())
    again: list[Any] = []
    _, again_traced = Peak().measure(lambda: again.append(store.put(payload).unwrap()))
    # Then it was stored whole in one PUT, written once, and the PUT never held a copy of the payload
    assert store.verify(ContentHash.of(payload)).unwrap() == 64 * MiB and again[0].written is False
    print(f"\nsingle PUT of 64 MiB: RSS +{first_rss / MiB:.1f} MiB, traced +{first_traced / MiB:.1f} MiB")
    assert first_traced < 8 * MiB and again_traced < 8 * MiB
    store.close()
