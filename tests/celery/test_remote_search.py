"""Searches routed to the search workers (``DATAMESH_INDEX_READS=workers``): a reader on another host.

The workers own data dir A (the AP shards and the regional indexes); the reader runs with an empty
data dir B and index dir, standing for a machine that does not see the workers' disk.  A reader on
host A that opens the index files itself (``files``) is the reference: the remote path must give
the very same hits.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import redis

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import StorageError, ValidationError
from datamesh.core.principal import Principal, Role
from datamesh.core.result import Err
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.pipeline.search import SearchResult
from datamesh.workers import queues
from tests.celery.conftest import Workers
from tests.celery.test_remote_reads import on_another_host
from tests.helpers import alpaca, real_requests

REGION = GeoRegion.EU_WEST
DIM = 384  # the index's default embedding size


def remote_reader(config: DataMeshConfig, root: Path, **changes: object) -> DataMeshConfig:
    """A reader on host B: AP reads and searches both through the workers."""
    return on_another_host(config, root / "host-b", "workers", index_reads="workers", **changes)


def embedded(n: int, entity: EntityId) -> list[IngestionRequest]:
    """Turns with their own embeddings (a different direction each), for vector searches."""
    vectors = [tuple(math.cos(i * (j + 1) * 0.37) for j in range(DIM)) for i in range(1, n + 1)]
    return [
        IngestionRequest(
            entity_id=entity, prompt=f"vector turn {i}".encode(), response=b"r", geo_region=REGION, embedding=v
        )
        for i, v in enumerate(vectors)
    ]


def index_files(root: Path) -> list[Path]:
    return list(root.rglob("*.sqlite")) + list(root.rglob("*.faiss")) if root.exists() else []


async def both(
    remote: IngestionPipeline, local: IngestionPipeline, **query: object
) -> tuple[list[SearchResult], list[SearchResult]]:
    return (await remote.search(**query)).unwrap(), (await local.search(**query)).unwrap()  # type: ignore[arg-type]


async def test_a_reader_on_another_host_finds_what_a_reader_of_the_files_finds(
    workers: Workers, celery_config: DataMeshConfig, tmp_path: Path
) -> None:
    # Given the saga's workers for eu-west, its index writer, and a search pool for every region,
    # all sharing data dir A,
    workers.config = celery_config = celery_config.with_changes(saga_lease_s=20.0)  # a busy 2-core box
    workers.start("--role", "cp")
    workers.start("--role", "blobs", "--region", "eu-west")
    workers.start("--role", "ap", "--region", "eu-west")
    workers.start("--role", "index", "--region", "eu-west")
    workers.start("--role", "search", "--processes", "2")
    workers.wait_ready(5)
    reader = remote_reader(celery_config, tmp_path)
    requests = real_requests(16)
    vectors = embedded(4, requests[0].entity_id)
    async with (
        (await IngestionPipeline.create(reader)).unwrap() as remote,
        (await IngestionPipeline.create(celery_config)).unwrap() as local,
    ):
        # when a reader on host B ingests real conversations and waits for the index workers,
        ingested = [r.unwrap() for r in (await remote.ingest_many(requests + vectors)).unwrap()]
        (await remote.flush_index()).unwrap()  # under Celery: drains published, the outbox waited for
        # then its searches give exactly the hits (ids, scores, order, snippets) a reader of the
        # files on host A gets: by words, in one region or all, by vector and by both,
        for row in alpaca()[:6]:
            words = " ".join(row["instruction"].split()[:6])
            for region in (None, "eu-west"):
                far, near = await both(remote, local, text=words, region=region, limit=10)
                assert far == near and far, (words, region)
        probe = vectors[2].embedding
        far, near = await both(remote, local, vector=probe, limit=5)
        assert far == near and far[0].conversation_id == ingested[len(requests) + 2].conversation_id
        far, near = await both(remote, local, text="vector turn", vector=probe, limit=5)
        assert far == near and far
        # a region without an index answers empty, as it does from the files,
        assert (await remote.search("the", region="us-east")).unwrap() == []
        # a query the index refuses is the same validation error,
        refused = await remote.search("!!! ???", region="eu-west")
        assert isinstance(refused, Err) and isinstance(refused.error, ValidationError)
        assert refused.error == (await local.search("!!! ???", region="eu-west")).error
        # and the indexes' counts come from the search workers too.
        regions = list(GeoRegion)
        counts = remote.indexes.count_regions(regions).unwrap()
        assert counts == local.indexes.count_regions(regions).unwrap()
        assert counts[regions.index(REGION)] == len(requests) + len(vectors)
        # The access filter travels into the remote query: a principal granted one entity finds none
        # of another entity's turns, even by that turn's own words, and ranks like the files reader.
        granted, other = requests[0].entity_id, requests[1].entity_id
        narrow = Principal(
            tenant=reader.tenant, name="narrow", roles=frozenset({Role.READER}), entities=frozenset({str(granted)})
        )
        words = " ".join(alpaca()[1]["instruction"].split()[:6])  # a turn of ``other``
        wide_hits = (await remote.search(words, limit=50)).unwrap()
        assert any(h.entity_id == other for h in wide_hits)
        far, near = await both(remote, local, text=words, limit=50, principal=narrow)
        assert far == near and all(h.entity_id == granted for h in far)
        far, near = await both(remote, local, text="the", limit=50, principal=narrow)
        assert far == near and far and {h.entity_id for h in far} == {granted}
    # Host B never held an index file, and a reader there that searches the files finds nothing.
    assert index_files(tmp_path / "host-b") == []
    async with (await IngestionPipeline.create(reader.with_changes(index_reads="files"))).unwrap() as blind:
        assert (await blind.search(words, limit=50)).unwrap() == []


async def test_a_search_whose_workers_are_down_fails_within_the_timeout(
    workers: Workers, celery_config: DataMeshConfig, tmp_path: Path
) -> None:
    # Given a search pool that answers (eu-west has no index yet: no hits),
    node = workers.start("--role", "search", "--region", "eu-west")
    workers.wait_ready()
    reader = remote_reader(celery_config, tmp_path, search_timeout_s=2.0)
    async with (await IngestionPipeline.create(reader)).unwrap() as p:
        assert (await p.search("anything", region="eu-west")).unwrap() == []
        # when it is killed and the reader searches again,
        workers.kill_node(node)
        started = time.monotonic()
        found = await p.search("anything", region="eu-west")
        waited = time.monotonic() - started
        # (and a search of every region waits for them all at once: one timeout, not five)
        started = time.monotonic()
        everywhere = await p.search("anything")
        waited_everywhere = time.monotonic() - started
    # then the search fails after the timeout, not later, with a retryable error naming region and queue
    assert isinstance(found, Err) and isinstance(found.error, StorageError), found
    error = found.error
    assert error.retryable and error.tier == "index"
    assert "eu-west (queue search.eu-west)" in error.message and "within 2s" in error.message
    assert 2.0 <= waited < 2.0 + 5.0, waited
    assert isinstance(everywhere, Err) and "within 2s" in everywhere.error.message
    assert 2.0 <= waited_everywhere < 2.0 + 5.0, waited_everywhere  # asked one after another: 10 s
    # and the question waits in the queue, to be dropped unread (expired) by a worker that comes back.
    broker = redis.Redis.from_url(celery_config.broker_url)
    assert broker.llen(queues.search_queue("eu-west")) == 2
    broker.close()


def test_searches_default_to_the_files() -> None:
    config = DataMeshConfig.from_env({}).unwrap()
    assert (config.index_reads, config.search_timeout_s) == ("files", 10.0)
    workers = DataMeshConfig.from_env({"DATAMESH_INDEX_READS": "workers", "DATAMESH_SEARCH_TIMEOUT_S": "2.5"}).unwrap()
    assert (workers.index_reads, workers.search_timeout_s) == ("workers", 2.5)
