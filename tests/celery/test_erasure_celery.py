"""Erasure under Celery with a worker per role: the index worker removes the index entries and the
AP shard's owner deletes the content (``delete_ap``), whatever the deployment's split."""

from __future__ import annotations

import dataclasses
import signal

import pytest

from datamesh.core.config import DataMeshConfig
from datamesh.core.types import ConversationId, EntityId, GeoRegion
from datamesh.pipeline import indexer
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.storage.cp import conversations
from datamesh.workers import queues
from datamesh.workers.executor import CeleryExecutor
from tests.celery.conftest import Workers, eventually, runs_per_node
from tests.helpers import real_requests

REGION = GeoRegion.EU_WEST


def owed(p: IngestionPipeline) -> int:
    return sum(d.rows for d in indexer.outbox_status(p.tiers).unwrap().regions.values())


def ap_keys(p: IngestionPipeline, entity: EntityId) -> int:
    """AP records of ``entity`` as a reader of the shards sees them (LSM: as last flushed)."""
    return len(p.tiers.ap.scan_entity(REGION, entity).unwrap())


def indexed(p: IngestionPipeline) -> int:
    """Turns in the region's index (one per conversation here)."""
    return p.indexes.region(REGION).unwrap().count().unwrap()


def statuses(p: IngestionPipeline, ids: list[ConversationId]) -> dict[str, str]:
    wanted = [str(i) for i in ids]
    rows = p.tiers.cp.run(lambda c: conversations.get_many(c, wanted), operation="test", write=False).unwrap()
    return {cid: row.status for cid, row in rows.items()}


# LSM shards: the strict case, where the owner's memtable holds records no reader sees yet.  With
# SQLite shards the same hand-off runs in test_index_celery.py's erasure (a ``--role all`` pool).
@pytest.mark.parametrize("celery_config", ["lsm"], indirect=True)
async def test_a_split_deployment_erases_ap_content_through_the_shard_owners(
    workers: Workers, celery_config: DataMeshConfig
) -> None:
    # Given one worker per role, as docker-compose.yml deploys them (the index worker mounts the AP
    # shards read-only and writes none of them)
    workers.config = celery_config = celery_config.with_changes(saga_lease_s=20.0)
    workers.start("--role", "cp", "--name", "cp")
    workers.start("--role", "blobs", "--region", REGION.value, "--name", "blobs")
    ap_worker = workers.start("--role", "ap", "--region", REGION.value, "--name", "ap1")
    workers.start("--role", "index", "--region", REGION.value, "--name", "index")
    workers.wait_ready(4)
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        # and two entities' real conversations, committed and indexed
        requests = real_requests(8, entities=2)
        ids = [r.unwrap().conversation_id for r in (await p.ingest_many(requests)).unwrap()]
        first, second = requests[0].entity_id, requests[1].entity_id
        of_first = [cid for cid, r in zip(ids, requests, strict=True) if r.entity_id == first]
        (await p.flush_index()).unwrap()
        assert indexed(p) == len(ids)
        await eventually(lambda: _assert_equal(ap_keys(p, first), 4))
        # When the AP worker is down and one conversation is erased
        ap_worker.send_signal(signal.SIGTERM)
        ap_worker.wait(timeout=30)
        workers.procs.remove(ap_worker)
        victim = of_first[0]
        (await p.erase_conversation(victim)).unwrap()
        # then the index worker removes its index entries at once, but its AP record stays, owed:
        # only the shard's owner deletes it
        await eventually(lambda: _assert_equal(indexed(p), len(ids) - 1), timeout=60)
        assert ap_keys(p, first) == 4 and owed(p) == 1
        # When an AP worker for the region comes back
        workers.start("--role", "ap", "--region", REGION.value, "--name", "ap2")
        workers.wait_ready(4)
        # then it deletes the record and settles the outbox
        await eventually(lambda: _assert_equal((owed(p), ap_keys(p, first)), (0, 3)), timeout=60)
        # And when the whole first entity is erased (its records may sit unflushed in the owner's memtable)
        more = [dataclasses.replace(r, entity_id=first) for r in real_requests(2)]
        ids += [r.unwrap().conversation_id for r in (await p.ingest_many(more)).unwrap()]
        (await p.erase_entity(first)).unwrap()
        (await p.flush_index()).unwrap()  # publishes drains, waits for an empty outbox
        # then no tier keeps anything of it, and the other entity is untouched
        await eventually(lambda: _assert_equal(ap_keys(p, first), 0))
        assert ap_keys(p, second) == 4
        assert indexed(p) == 4
        kept = {str(cid) for cid, r in zip(ids, requests + more, strict=True) if r.entity_id == second}
        assert {cid for cid, s in statuses(p, ids).items() if s == conversations.ACTIVE} == kept
        # and the deletes ran on the AP workers, never on the index worker
        executor = p._executor
        assert isinstance(executor, CeleryExecutor)
        runs = runs_per_node(executor.app, queues.DELETE_AP)
        assert runs["ap2"] >= 2 and runs["index"] == runs["cp"] == runs["blobs"] == 0, runs


def _assert_equal(got: object, want: object) -> None:
    assert got == want, got
