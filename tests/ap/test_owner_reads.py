"""A worker reads the LSM shards it writes through its own writer (index drains, reads routed to the
owner): no wait for a flush."""

from __future__ import annotations

from pathlib import Path

from datamesh.core.result import Ok
from datamesh.core.types import GeoRegion
from datamesh.pipeline.tiers import engine_for, readonly_engine_for
from datamesh.storage.ap.base import ShardEngine
from datamesh.storage.ap.store import ContentStore, shard_for
from datamesh.workers.runtime import _ReaderAp

REGION = GeoRegion.EU_WEST


def test_shards_this_worker_writes_are_read_through_its_writer(tmp_path: Path) -> None:
    # Given a worker's writer tier with LSM shards, holding turns of shard 0 only in its memtable
    writer = ContentStore(tmp_path, 2, engine_factory=engine_for("lsm"))
    keys = [bytes([n]) * 16 + b"turn" for n in range(200)]
    mine = [k for k in keys if shard_for(k, 2) == 0]
    theirs = [k for k in keys if shard_for(k, 2) == 1]
    assert mine and theirs
    assert writer.put_many(REGION, [(k, b"content " + k) for k in mine]) == Ok(len(mine))
    # and another process's turns on shard 1, flushed to its runs
    other = ContentStore(tmp_path, 2, engine_factory=engine_for("lsm"))
    assert other.put_many(REGION, [(k, b"content " + k) for k in theirs]) == Ok(len(theirs))
    other.close()
    opened: list[Path] = []

    def reader(path: Path) -> ShardEngine:
        opened.append(path)
        return readonly_engine_for("lsm")(path)

    index_ap = _ReaderAp(tmp_path, 2, writer=writer, reader=reader)
    # When an index drain reads every turn
    found = index_ap.get_many(REGION, keys).unwrap()
    # Then all are found: shard 0's unflushed turns through the writer, with no read-only handle
    # opened on it, and shard 1's through a read-only handle on its runs
    assert found == {k: b"content " + k for k in keys}
    assert opened == [writer.shard_path(REGION, 1)]
    index_ap.close()
    writer.close()


def test_lsm_shards_take_their_log_fsync_policy_from_the_configuration(tmp_path: Path) -> None:
    from datamesh.core.config import DataMeshConfig
    from datamesh.storage.ap.lsm import DEFAULT_FSYNC_INTERVAL_S, FsyncPolicy, LsmShard

    # Given a configuration asking LSM shards to sync their logs at most every 0.2 s
    config = DataMeshConfig.from_env(
        {"DATAMESH_AP_ENGINE": "lsm", "DATAMESH_AP_LSM_FSYNC": "interval", "DATAMESH_AP_LSM_FSYNC_INTERVAL_S": "0.2"}
    ).unwrap()
    # When the AP tier's engine opens a shard, then its log follows that policy
    shard = engine_for(config.ap_engine, config)(tmp_path / "shard-000")
    assert isinstance(shard, LsmShard)
    assert shard._log.policy is FsyncPolicy.INTERVAL and shard._log._interval == 0.2
    shard.close()
    # And by default every batch is synced before it is acknowledged
    default = engine_for("lsm", DataMeshConfig())(tmp_path / "shard-001")
    assert isinstance(default, LsmShard) and default._log.policy is FsyncPolicy.ALWAYS
    assert default._log._interval == DEFAULT_FSYNC_INTERVAL_S  # the configuration's default is the shard's
    default.close()
