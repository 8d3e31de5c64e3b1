"""Reads routed to the shards' owners (``DATAMESH_AP_READS=workers``): a reader on another host.

The workers own data dir A; the reader runs with an empty data dir B, standing for a machine that
does not see the workers' disk (the object store and the CP database are shared services, as in a
deployment).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
import redis

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import ConfigError, StorageError
from datamesh.core.result import Err
from datamesh.core.types import ConversationId, EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.pipeline.tiers import Tiers, readonly_engine_for
from datamesh.storage.ap.record import turn_key
from datamesh.workers import queues
from tests.celery.conftest import Workers
from tests.helpers import TierCounts, real_requests, tier_counts

REGION = GeoRegion.EU_WEST


def on_another_host(workers_config: DataMeshConfig, data_dir: Path, reads: str, **changes: object) -> DataMeshConfig:
    """A caller's configuration with its own empty data dir: shared CP, broker and object store only."""
    return workers_config.with_changes(
        data_dir=data_dir, objects_url=workers_config.resolved_objects_url, ap_reads=reads, **changes
    )


def owners_running(workers: Workers, config: DataMeshConfig, data_dir: Path, **changes: object) -> DataMeshConfig:
    """Start an ``all`` pool owning every shard (data dir A) and return the configuration of a
    reader on another host (``data_dir``, empty) whose AP reads go to the owners."""
    workers.start("--role", "all")
    workers.wait_ready()
    return on_another_host(config, data_dir, "workers", **changes)


def shard_files(root: Path) -> list[Path]:
    return list(root.rglob("shard-*")) if root.exists() else []


@pytest.mark.parametrize("celery_config", ["sqlite", "lsm"], indirect=True)
async def test_a_reader_on_another_host_reads_through_the_owners(
    workers: Workers, celery_config: DataMeshConfig, tmp_path: Path
) -> None:
    # Given workers owning the shards in data dir A, and a reader whose data dir B is empty
    reader = owners_running(workers, celery_config, tmp_path / "host-b")
    requests = real_requests(24)
    big = b"B" * (celery_config.inline_max_bytes + 3)  # kept in the (shared) object store
    requests.append(IngestionRequest(entity_id=EntityId.generate(), prompt=b"p", response=big, geo_region=REGION))
    async with (await IngestionPipeline.create(reader)).unwrap() as p:
        results = (await p.ingest_many(requests)).unwrap()
        ids = [r.unwrap().conversation_id for r in results]
        # When it reads every conversation back at once, right after the commit (an LSM owner still
        # holds them in its memtable)
        stored = await asyncio.gather(*(p.get(cid) for cid in ids))
        # Then each comes back with its full content, verified against the CP hashes
        for request, got in zip(requests, stored, strict=True):
            turn = got.unwrap().turns[0]
            assert (turn.prompt, turn.response) == (request.prompt, request.response)
        # and scans and counts are answered by the owners too,
        entity = requests[0].entity_id
        scanned = p.tiers.ap.scan_entity(REGION, entity).unwrap()
        assert len(scanned) == sum(1 for r in requests if r.entity_id == entity)
        assert tier_counts(p.tiers).ap_rows == len(requests)
        # keys the owner does not have come back missing, as from a local read,
        unknown = turn_key(entity, ConversationId.generate(), stored[0].unwrap().turns[0].turn_id)
        assert p.tiers.ap.get_many(REGION, [unknown]).unwrap() == {}
        # a write through the reader's AP tier is refused, naming the owner's queue,
        refused = p.tiers.ap.put_many(REGION, [(unknown, b"x")])
        assert isinstance(refused, Err) and "read through its owner" in refused.error.message
        assert "queue ap.eu-west." in refused.error.message
    # and host B never held a shard file.
    assert shard_files(tmp_path / "host-b") == []
    # While a reader on host B that opens the shard files itself finds no content at all.
    async with (await IngestionPipeline.create(reader.with_changes(ap_reads="files"))).unwrap() as p:
        local = await p.get(ids[0])
        assert isinstance(local, Err) and isinstance(local.error, StorageError)
        assert "missing from the AP tier" in local.error.message


async def test_a_read_whose_owner_is_down_fails_within_the_timeout(
    workers: Workers, celery_config: DataMeshConfig, tmp_path: Path
) -> None:
    # Given conversations written by workers that are then killed (nobody consumes the read queues)
    reader = owners_running(workers, celery_config, tmp_path / "host-b", ap_read_timeout_s=2.0)
    requests = real_requests(8)
    async with (await IngestionPipeline.create(reader)).unwrap() as p:
        ids = [r.unwrap().conversation_id for r in (await p.ingest_many(requests)).unwrap()]
        workers.kill()
        before = stored(celery_config)
        # When the reader reads one of them
        started = time.monotonic()
        read = await p.get(ids[0])
        waited = time.monotonic() - started
    # Then it fails after the timeout, not later, with a retryable error naming region, shard and queue
    assert isinstance(read, Err) and isinstance(read.error, StorageError), read
    error = read.error
    shard = p.tiers.ap.shard_of(requests[0].entity_id)
    assert error.retryable and error.tier == "ap"
    assert f"shard {shard} of eu-west (queue {queues.ap_read_queue('eu-west', shard)})" in error.message
    assert "within 2s" in error.message
    assert 2.0 <= waited < 2.0 + 5.0, waited
    # the read waits in its owner's read queue (to be dropped unread once expired), and nothing
    # stored changed: the CP rows, the AP content in the workers' files and the blobs.
    broker = redis.Redis.from_url(celery_config.broker_url)
    assert broker.llen(queues.ap_read_queue("eu-west", shard)) == 1
    broker.close()
    assert stored(celery_config) == before


async def test_a_read_of_several_shards_asks_every_owner_at_once(
    workers: Workers, celery_config: DataMeshConfig, tmp_path: Path
) -> None:
    # Given turns of entities on every shard, written by workers that are then killed
    reader = owners_running(workers, celery_config, tmp_path / "host-b", ap_read_timeout_s=3.0)
    requests = real_requests(32, entities=16)  # 16 entities: all in one of the 4 shards has odds 4^-15
    async with (await IngestionPipeline.create(reader)).unwrap() as p:
        ap = p.tiers.ap
        results = [r.unwrap() for r in (await p.ingest_many(requests)).unwrap()]
        keys = [turn_key(q.entity_id, r.conversation_id, r.turn_id) for q, r in zip(requests, results, strict=True)]
        shards = sorted({ap.shard_of(q.entity_id) for q in requests})
        assert len(shards) > 1, "the entities must fall in several shards"
        workers.kill()
        # When the reader reads all their keys in one call
        started = time.monotonic()
        read = await asyncio.to_thread(ap.get_many, REGION, keys)
        waited = time.monotonic() - started
    # Then every shard's owner was asked before the first answer was awaited: each read queue holds
    # its question, and the call failed after one timeout, not one per shard
    broker = redis.Redis.from_url(celery_config.broker_url)
    assert [broker.llen(queues.ap_read_queue("eu-west", s)) for s in shards] == [1] * len(shards)
    broker.close()
    assert isinstance(read, Err) and read.error.retryable and "within 3s" in read.error.message
    assert waited < 3.0 * 2, (waited, len(shards))


def stored(config: DataMeshConfig) -> TierCounts:
    """What is stored, seen from the workers' host: their files (data dir A) opened read-only."""
    tiers = Tiers.open(config, engine_factory=readonly_engine_for(config.ap_engine)).unwrap()
    try:
        return tier_counts(tiers)
    finally:
        tiers.close()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        (variable, value)
        for mode, timeout in (
            ("DATAMESH_AP_READS", "DATAMESH_AP_READ_TIMEOUT_S"),
            ("DATAMESH_INDEX_READS", "DATAMESH_SEARCH_TIMEOUT_S"),
        )
        for variable, value in ((mode, "remote"), (timeout, "0"), (timeout, "soon"))
    ],
)
def test_a_bad_read_or_search_setting_is_a_config_error(variable: str, value: str) -> None:
    # Given a bad value for one of the settings of reads and searches routed to workers, when the
    # configuration is read,
    config = DataMeshConfig.from_env({variable: value})
    # then it is an error naming the variable (and, for a mode, the allowed values).
    assert isinstance(config, Err) and isinstance(config.error, ConfigError)
    assert config.error.variable == variable
    if variable.endswith("_READS"):
        assert "files, workers" in config.error.message


def test_reads_default_to_the_files_and_the_broker_carries_their_answers() -> None:
    config = DataMeshConfig.from_env({"DATAMESH_BROKER_URL": "redis://broker.example:6379/3"}).unwrap()
    assert (config.ap_reads, config.ap_read_timeout_s) == ("files", 10.0)
    assert config.resolved_result_backend == "redis://broker.example:6379/3"
    workers = DataMeshConfig.from_env({"DATAMESH_AP_READS": "workers", "DATAMESH_AP_READ_TIMEOUT_S": "2.5"}).unwrap()
    assert (workers.ap_reads, workers.ap_read_timeout_s) == ("workers", 2.5)
