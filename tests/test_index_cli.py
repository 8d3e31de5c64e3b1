"""``python -m datamesh index status|rebuild|drain`` run as an operator would."""

from __future__ import annotations

import shutil
from pathlib import Path

from datamesh.core.config import DataMeshConfig
from datamesh.core.types import GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline
from tests.helpers import alpaca, real_requests
from tests.test_cli import run


async def test_status_rebuild_and_drain(tmp_path: Path) -> None:
    # Given committed turns in two regions whose index outbox was never drained
    config = DataMeshConfig(data_dir=tmp_path / "data", indexer=False)
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        (await p.ingest_many(real_requests(5))).unwrap()
        (await p.ingest_many(real_requests(3, region=GeoRegion.US_EAST))).unwrap()
    env = {"DATAMESH_DATA_DIR": str(config.data_dir)}
    status = run(["-m", "datamesh", "index", "status"], tmp_path, **env)
    owed = {line.split()[0]: int(line.split()[1]) for line in status.stdout.splitlines()[1:6]}
    assert status.returncode == 0 and owed["eu-west"] == 1 and owed["us-east"] == 1, status.stdout
    # when a region is rebuilt, its turns are indexed (the outbox is left to the indexer)
    rebuilt = run(["-m", "datamesh", "index", "rebuild", "--region", "eu-west"], tmp_path, **env)
    assert rebuilt.returncode == 0 and "eu-west: 5 turns indexed, 5 in the index" in rebuilt.stdout
    # and drain does the outbox's work
    drained = run(["-m", "datamesh", "index", "drain"], tmp_path, **env)
    assert drained.returncode == 0 and "2 outbox rows done, 0 failed" in drained.stdout
    after = run(["-m", "datamesh", "index", "status"], tmp_path, **env)
    assert all(int(line.split()[1]) == 0 for line in after.stdout.splitlines()[1:6])
    assert "us-east" in after.stdout and " 3\n" in after.stdout
    bad = run(["-m", "datamesh", "index", "rebuild", "--region", "mars"], tmp_path, **env)
    assert bad.returncode != 0


async def test_rebuild_from_nothing_restores_search(tmp_path: Path) -> None:
    config = DataMeshConfig(data_dir=tmp_path / "data", indexer=False)
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        results = [r.unwrap() for r in (await p.ingest_many(real_requests(12))).unwrap()]
        (await p.flush_index()).unwrap()
        (await p.erase_conversation(results[0].conversation_id)).unwrap()
    # Given the index files are lost
    shutil.rmtree(config.resolved_index_dir)
    out = run(["-m", "datamesh", "index", "rebuild"], tmp_path, DATAMESH_DATA_DIR=str(config.data_dir))
    assert out.returncode == 0 and "eu-west: 11 turns indexed, 11 in the index" in out.stdout
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        words = " ".join(alpaca()[4]["instruction"].split()[:6])
        hits = (await p.search(words, region=GeoRegion.EU_WEST)).unwrap()
        assert results[4].conversation_id in [h.conversation_id for h in hits]
        erased_words = " ".join(alpaca()[0]["instruction"].split()[:6])
        erased = (await p.search(erased_words, limit=50)).unwrap()
        assert results[0].conversation_id not in [h.conversation_id for h in erased]
