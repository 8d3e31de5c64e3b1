"""RPO=0: with a synchronous standby no acknowledged commit is lost, and none is faked.

The slow test builds a real primary and streaming standby (``pg_cluster``).  Given synchronous
replication, when the standby is down a commit is not acknowledged: the caller gets an in-doubt
``StorageError`` after the commit timeout, never a success; when it is up and the primary is
killed, every acknowledged conversation is on the promoted standby.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import ConfigError, StorageError
from datamesh.core.result import Err
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.pipeline.steps import Step
from datamesh.storage.cp import conversations, migrate, provenance
from datamesh.storage.cp.database import CpDatabase, is_commit_in_doubt
from tests.conftest import service_missing
from tests.helpers import real_requests
from tests.pg_cluster import ClusterUnavailable, PgCluster

COMMIT_TIMEOUT_S = 1.5


async def test_pipeline_refuses_to_start_without_sync_replication(pg_cp_url: str, tmp_path: Path) -> None:
    # Given the test server, which has no standby, and the requirement switched on
    config = DataMeshConfig(data_dir=tmp_path, cp_url=pg_cp_url, cp_require_sync_replication=True)
    # When the pipeline starts, then it refuses, naming what is missing
    started = await IngestionPipeline.create(config)
    assert isinstance(started, Err) and isinstance(started.error, StorageError)
    assert "synchronous_standby_names is empty" in started.error.message
    assert "DATAMESH_CP_REQUIRE_SYNC_REPLICATION" in started.error.message
    # and SQLite can never meet it
    local = await IngestionPipeline.create(DataMeshConfig(data_dir=tmp_path / "l", cp_require_sync_replication=True))
    assert isinstance(local, Err) and isinstance(local.error, ConfigError)


@pytest.fixture
def cluster() -> Iterator[PgCluster]:
    try:
        built = PgCluster.create()
    except (ClusterUnavailable, RuntimeError) as exc:
        service_missing("a PostgreSQL 15 primary + standby built from local binaries", exc)
    try:
        yield built
    finally:
        built.destroy()


def _request(i: int, entity: EntityId, key: str | None = None) -> IngestionRequest:
    return IngestionRequest(
        entity_id=entity,
        prompt=f"rpo prompt {i}".encode(),
        response=f"rpo response {i}".encode(),
        geo_region=GeoRegion.EU_WEST,
        idempotency_key=key,
    )


@pytest.mark.slow
async def test_sync_standby_rpo_zero(cluster: PgCluster, tmp_path: Path) -> None:
    primary_url = cluster.url(cluster.primary_port)
    db = CpDatabase.open(primary_url, commit_timeout_s=COMMIT_TIMEOUT_S).unwrap()
    migrate.upgrade(db).unwrap()
    db.run(lambda c: c.execute(text("CREATE TABLE probe (x int)")), operation="t").unwrap()
    config = DataMeshConfig(
        data_dir=tmp_path / "data",
        cp_url=primary_url,
        cp_require_sync_replication=True,
        cp_commit_timeout_s=COMMIT_TIMEOUT_S,
    )
    stop_standby_before_pivot = {"armed": False}

    def faults(step: str, phase: str) -> None:
        if stop_standby_before_pivot["armed"] and step == Step.COMMIT_CP and phase == "before":
            stop_standby_before_pivot["armed"] = False
            cluster.stop(cluster.standby, "immediate")

    entity = EntityId.generate()
    started = await IngestionPipeline.create(config, faults=faults)
    assert started.is_ok(), started
    async with started.unwrap() as p:
        # (a) Given the standby goes down just before the pivot, when the saga commits,
        stop_standby_before_pivot["armed"] = True
        began = time.monotonic()
        in_doubt = await p.ingest(_request(0, entity, key="in-doubt"))
        waited = time.monotonic() - began
        # then the caller gets a clear in-doubt error after the commit timeout, not a success,
        assert isinstance(in_doubt, Err) and isinstance(in_doubt.error, StorageError), in_doubt
        assert is_commit_in_doubt(in_doubt.error) and "idempotency key" in in_doubt.error.message
        assert COMMIT_TIMEOUT_S <= waited < COMMIT_TIMEOUT_S + 15
        print(f"in-doubt after {waited:.2f}s: {in_doubt.error}")
        # ... a plain CP write is refused the same way,
        probe = db.run(lambda c: c.execute(text("INSERT INTO probe VALUES (1)")), operation="t.probe")
        assert isinstance(probe, Err) and is_commit_in_doubt(probe.error)
        assert db.stats.in_doubt == 1
        # ... and a new pipeline refuses to start.
        refused = await IngestionPipeline.create(config)
        assert isinstance(refused, Err) and "no standby streaming" in str(refused.error)

        # When the standby is back, the retried request returns the first result (nothing doubled).
        cluster.start(cluster.standby, cluster.standby_port)
        cluster.wait_for_sync_standby()
        replay = (await p.ingest(_request(0, entity, key="in-doubt"))).unwrap()
        assert replay.deduplicated
        acknowledged = {str(replay.conversation_id)}

        # (b) Given the standby is up, when conversations are acknowledged,
        batch = (await p.ingest_many(real_requests(20))).unwrap()
        acknowledged |= {str(r.unwrap().conversation_id) for r in batch}
        for i in range(1, 6):
            acknowledged.add(str((await p.ingest(_request(i, entity))).unwrap().conversation_id))
        # and the primary is killed (SIGKILL, no shutdown) and the standby promoted,
        cluster.kill_primary()
    db.dispose()
    cluster.promote()

    # then every acknowledged conversation is on the new primary, with its turns and provenance.
    promoted = CpDatabase.open(cluster.url(cluster.standby_port)).unwrap()

    def inspect(conn: Any) -> dict[str, Any]:
        rows = conversations.get_many(conn, sorted(acknowledged))
        chains = {cid: provenance.verify(conn, cid) for cid in rows}
        return {"rows": rows, "chains": chains, "probe": conn.execute(text("SELECT count(*) FROM probe")).scalar()}

    found = promoted.run(inspect, operation="t", write=False).unwrap()
    promoted.dispose()
    assert set(found["rows"]) == acknowledged and len(acknowledged) == 26
    assert all(broken is None and checked >= 2 for checked, broken in found["chains"].values())
    # (the in-doubt probe row was durable on the old primary only, and reached the standby when it
    # came back: "in doubt" means exactly that the caller cannot know)
    assert found["probe"] == 1
