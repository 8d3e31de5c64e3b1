"""Fixtures of the AP tier tests: one contract suite runs against every shard engine."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from datamesh.storage.ap.base import ShardEngine
from datamesh.storage.ap.lsm import LsmShard
from datamesh.storage.ap.sqlite_shard import SqliteShard

OpenShard = Callable[..., ShardEngine]


def _open_sqlite(path: Path, *, readonly: bool = False) -> ShardEngine:
    return SqliteShard(path.with_suffix(".sqlite3"), readonly=readonly)


def _open_lsm(path: Path, *, readonly: bool = False) -> ShardEngine:
    # A tiny memtable and fanout so that the contract runs through flushes, runs and compactions.
    return LsmShard(path.with_suffix(".lsm"), readonly=readonly, memtable_bytes=4096, tier_fanout=2, block_entries=8)


@pytest.fixture(params=[_open_sqlite, _open_lsm], ids=["sqlite", "lsm"])
def open_shard(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenShard]:
    """Opens shards of one engine at ``tmp_path/shard`` and closes every one at teardown."""
    opened: list[ShardEngine] = []
    factory: OpenShard = request.param

    def open_(*, readonly: bool = False) -> ShardEngine:
        engine = factory(tmp_path / "shard", readonly=readonly)
        opened.append(engine)
        return engine

    yield open_
    for engine in reversed(opened):
        engine.close()
