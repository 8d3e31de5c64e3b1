"""The object store inside the pipeline: residency, GC safety, scrub, and permanent failures."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import SagaFailed
from datamesh.core.result import Err
from datamesh.core.types import ContentHash, EntityId, GeoRegion
from datamesh.pipeline.gc import collect_garbage, scrub
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.pipeline.saga import InjectedFault
from datamesh.pipeline.steps import Step
from datamesh.storage.objects.config import Location, ObjectsSettings
from tests.helpers import tier_counts
from tests.objects.conftest import MotoServer, corrupt, s3_settings

REGIONS = (GeoRegion.EU_WEST, GeoRegion.US_EAST)


@pytest.fixture(params=["fs", "s3"])
def objects_config(request: pytest.FixtureRequest, tmp_path: Path, cp_url: str) -> Iterator[DataMeshConfig]:
    """A pipeline configuration whose EU and US content go to separate locations of one backend."""
    if request.param == "fs":
        locations = {r: Location("file", str(tmp_path / "objects" / r.value)) for r in REGIONS}
        settings = ObjectsSettings(locations=locations)
    else:
        moto: MotoServer = request.getfixturevalue("moto")
        client = request.getfixturevalue("s3_client")
        buckets = {}
        for region in REGIONS:
            name = f"{region.value}-{request.getfixturevalue('bucket')}"[:63]
            client.create_bucket(Bucket=name)
            buckets[region] = name
        locations = {r: Location("s3", "blobs", bucket=buckets[r]) for r in REGIONS}
        settings = ObjectsSettings(locations=locations, s3=s3_settings(moto.endpoint))
    yield DataMeshConfig(data_dir=tmp_path / "data", cp_url=cp_url, objects=settings)


def big(config: DataMeshConfig, tag: bytes) -> bytes:
    return tag * (config.inline_max_bytes // len(tag) + 2)


async def test_content_stays_in_its_region(objects_config: DataMeshConfig) -> None:
    async with (await IngestionPipeline.create(objects_config)).unwrap() as p:
        payload = big(objects_config, b"eu-only ")
        request = IngestionRequest(
            entity_id=EntityId.generate(), prompt=b"q", response=payload, geo_region=GeoRegion.EU_WEST
        )
        done = (await p.ingest(request)).unwrap()
        eu = p.tiers.objects.for_region(GeoRegion.EU_WEST).unwrap()
        us = p.tiers.objects.for_region(GeoRegion.US_EAST).unwrap()
        assert eu.list().unwrap() == [ContentHash.of(payload)] and us.list().unwrap() == []
        assert (await p.get(done.conversation_id)).unwrap().turns[0].response == payload
        # a region with no configured store is an error, not a fallback to another region
        elsewhere = IngestionRequest(
            entity_id=EntityId.generate(), prompt=b"q", response=payload, geo_region=GeoRegion.AP_SOUTHEAST
        )
        refused = await p.ingest(elsewhere)
        assert isinstance(refused, Err) and isinstance(refused.error, SagaFailed)
        assert "ap-southeast" in refused.error.message
        assert us.list().unwrap() == [] and tier_counts(p.tiers).rows["conversations"] == 1


async def test_gc_deletes_only_old_unreferenced_blobs(objects_config: DataMeshConfig) -> None:
    async with (await IngestionPipeline.create(objects_config)).unwrap() as p:
        kept = big(objects_config, b"referenced ")
        (
            await p.ingest(
                IngestionRequest(
                    entity_id=EntityId.generate(), prompt=b"q", response=kept, geo_region=GeoRegion.EU_WEST
                )
            )
        ).unwrap()
        store = p.tiers.objects.for_region(GeoRegion.EU_WEST).unwrap()
        orphan = store.put(b"written without a reference").unwrap().content_hash
        young = collect_garbage(p.tiers, grace_s=3600).unwrap()
        assert sum(len(r.deleted) for r in young) == 0  # within the grace period nothing goes
        dry = collect_garbage(p.tiers, grace_s=0, dry_run=True).unwrap()
        assert [h for r in dry for h in r.deleted] == [orphan.hex] and store.exists(orphan).unwrap()
        done = collect_garbage(p.tiers, grace_s=0).unwrap()
        assert [h for r in done for h in r.deleted] == [orphan.hex]
        assert store.list().unwrap() == [ContentHash.of(kept)]


async def test_gc_racing_ingests_of_the_same_content_loses_nothing(objects_config: DataMeshConfig) -> None:
    failing = {"armed": False}

    def sometimes_fail(step: str, phase: str) -> None:
        if failing["armed"] and step == Step.WRITE_AP and phase == "before":
            raise InjectedFault("compensate this one")

    async with (await IngestionPipeline.create(objects_config, faults=sometimes_fail)).unwrap() as p:
        shared = [big(objects_config, f"shared {i} ".encode()) for i in range(3)]
        stop = threading.Event()
        passes = [0]

        def collector() -> None:
            while not stop.is_set():
                collect_garbage(p.tiers, grace_s=0).unwrap()
                passes[0] += 1

        gc_thread = threading.Thread(target=collector)
        gc_thread.start()
        committed = []
        try:
            for round_ in range(12):
                failing["armed"] = round_ % 3 == 2  # every third round's saga fails and drops its references
                batch = [
                    IngestionRequest(
                        entity_id=EntityId.generate(),
                        prompt=f"r{round_} {i}".encode(),
                        response=shared[i % 3],
                        geo_region=GeoRegion.EU_WEST,
                    )
                    for i in range(4)
                ]
                results = (await p.ingest_many(batch)).unwrap()
                committed += [r.unwrap().conversation_id for r in results if r.is_ok()]
                await asyncio.sleep(0)
        finally:
            stop.set()
            gc_thread.join()
        assert passes[0] > 0 and len(committed) == 8 * 4
        for conversation_id in committed:  # every committed turn still reads its verified blob
            assert (await p.get(conversation_id)).is_ok()
        collect_garbage(p.tiers, grace_s=0).unwrap()
        store = p.tiers.objects.for_region(GeoRegion.EU_WEST).unwrap()
        assert sorted(store.list().unwrap()) == sorted(ContentHash.of(s) for s in shared)


async def test_scrub_reports_corrupt_and_missing(
    objects_config: DataMeshConfig, request: pytest.FixtureRequest
) -> None:
    async with (await IngestionPipeline.create(objects_config)).unwrap() as p:
        payloads = [big(objects_config, f"blob {i} ".encode()) for i in range(3)]
        for payload in payloads:
            (
                await p.ingest(
                    IngestionRequest(
                        entity_id=EntityId.generate(), prompt=b"q", response=payload, geo_region=GeoRegion.EU_WEST
                    )
                )
            ).unwrap()
        assert all(r.ok for r in scrub(p.tiers).unwrap().values())
        store: Any = p.tiers.objects.for_region(GeoRegion.EU_WEST).unwrap()
        corrupt(store, ContentHash.of(payloads[0]).hex)
        store.delete(ContentHash.of(payloads[1])).unwrap()
        report = scrub(p.tiers).unwrap()[GeoRegion.EU_WEST]
        assert report.corrupt == [ContentHash.of(payloads[0])]
        assert report.missing == [ContentHash.of(payloads[1])]


async def test_permanent_store_failure_compensates_the_saga(objects_config: DataMeshConfig) -> None:
    locations = dict(objects_config.objects.locations)  # type: ignore[union-attr]
    eu = locations[GeoRegion.EU_WEST]
    if eu.scheme == "s3":
        locations[GeoRegion.EU_WEST] = Location("s3", "blobs", bucket="bucket-that-does-not-exist")
    else:
        blocker = Path(eu.path).parent / "not-a-folder"
        blocker.parent.mkdir(parents=True, exist_ok=True)
        blocker.write_text("a file where the region's folder should be")
        locations[GeoRegion.EU_WEST] = Location("file", str(blocker / "objects"))
    broken = objects_config.with_changes(objects=ObjectsSettings(locations=locations, s3=objects_config.objects.s3))  # type: ignore[union-attr]
    created = await IngestionPipeline.create(broken)
    if isinstance(created, Err):  # the filesystem backend notices at start: a clear configuration error
        assert "DATAMESH_OBJECTS_URL_EU_WEST" in str(created.error)
        return
    async with created.unwrap() as p:
        request = IngestionRequest(
            entity_id=EntityId.generate(), prompt=b"q", response=big(broken, b"x"), geo_region=GeoRegion.EU_WEST
        )
        result = await p.ingest(request)
        assert isinstance(result, Err) and isinstance(result.error, SagaFailed)
        assert result.error.step == Step.STORE_BLOBS and "NoSuchBucket" in result.error.message
        counts = tier_counts(p.tiers, object_regions=(GeoRegion.US_EAST,))  # the EU bucket cannot be listed
        assert counts.stored() == 0 and counts.rows["object_refs"] == 0 and counts.rows["idempotency_keys"] == 0
