"""The seed API on the Celery executor: sagas run in real worker processes through a real broker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest

from datamesh.core.config import DataMeshConfig
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.storage.cp import sagas
from datamesh.workers.app import create_app
from datamesh.workers.queues import COMMIT_CP, WRITE_AP
from tests.celery.conftest import ROOT, Workers, env_of, eventually
from tests.helpers import real_requests, tier_counts
from tests.test_cli import SEED


def test_seed_example_runs_on_celery(workers: Workers, celery_config: DataMeshConfig) -> None:
    # Given a worker pool for every role,
    workers.start("--role", "all")
    workers.wait_ready()
    # when the README's seed example runs as written with DATAMESH_EXECUTOR=celery,
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DATAMESH_")}, **env_of(celery_config)}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-c", SEED], env=env, capture_output=True, text=True, timeout=120)
    # then it ingests, and through the workers: they ran its write_ap and commit_cp tasks.
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Ingested: "), out.stdout + out.stderr
    stats = create_app(celery_config, load_celeryconfig=False).control.inspect(timeout=2.0).stats() or {}
    runs = {name: sum(s.get("total", {}).get(name, 0) for s in stats.values()) for name in (WRITE_AP, COMMIT_CP)}
    assert runs[WRITE_AP] >= 1 and runs[COMMIT_CP] >= 1, runs


@pytest.mark.parametrize("celery_config", ["sqlite", "lsm"], indirect=True)
async def test_batches_wait_and_no_wait(workers: Workers, celery_config: DataMeshConfig) -> None:
    workers.start("--role", "all")
    workers.wait_ready()
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        # Given a batch with inline and object-store payloads in two regions,
        requests = real_requests(40)
        big = b"B" * (celery_config.inline_max_bytes + 7)
        requests.append(
            IngestionRequest(entity_id=EntityId.generate(), prompt=b"p", response=big, geo_region=GeoRegion.US_EAST)
        )
        # when it is ingested and waited for,
        results = (await p.ingest_many(requests)).unwrap()
        # then every turn committed and reads back verified,
        assert all(r.is_ok() and not r.unwrap().pending for r in results), [r for r in results if r.is_err()][:1]
        for request, result in zip(requests[::10], results[::10], strict=True):
            stored = (await p.get(result.unwrap().conversation_id)).unwrap()
            assert stored.turns[0].prompt == request.prompt and stored.turns[0].response == request.response
        # a replay is deduplicated,
        again = (await p.ingest_many(requests[:5])).unwrap()
        assert all(r.unwrap().deduplicated for r in again)
        # and wait=False returns a pending saga id whose status the pipeline reports.
        later = IngestionRequest(
            entity_id=EntityId.generate(), prompt=b"later", response=b"soon", geo_region=GeoRegion.EU_WEST
        )
        pending = (await p.ingest(later, wait=False)).unwrap()
        assert pending.pending
        for _ in range(200):
            status = (await p.saga_status(pending.saga_id)).unwrap()
            if status == sagas.SagaStatus.COMMITTED:
                break
            await asyncio.sleep(0.05)
        assert status == sagas.SagaStatus.COMMITTED

        def all_stored() -> None:  # LSM shards show the last writes to other processes once flushed
            counts = tier_counts(p.tiers)
            assert counts.rows["conversations"] == 42 and counts.ap_rows == 42 and counts.blobs == 1

        await eventually(all_stored)
