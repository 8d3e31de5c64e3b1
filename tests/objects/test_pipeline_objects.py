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
from datamesh.storage.cp.sagas import SagaStatus
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


async def test_a_compensation_only_drops_references_and_gc_collects_after_its_grace(
    objects_config: DataMeshConfig,
) -> None:
    fail = {"armed": True}

    def fail_after_blobs(step: str, phase: str) -> None:
        if fail["armed"] and step == Step.WRITE_AP and phase == "before":
            raise InjectedFault("compensate after the blob is stored")

    async with (await IngestionPipeline.create(objects_config, faults=fail_after_blobs)).unwrap() as p:
        payload = big(objects_config, b"written, then compensated ")
        request = IngestionRequest(
            entity_id=EntityId.generate(), prompt=b"q", response=payload, geo_region=GeoRegion.EU_WEST
        )
        # Given a saga that stored its blob, then failed and was compensated
        failed = await p.ingest(request)
        assert isinstance(failed, Err) and isinstance(failed.error, SagaFailed)
        # Then its reference is gone but the blob is not
        store = p.tiers.objects.for_region(GeoRegion.EU_WEST).unwrap()
        assert tier_counts(p.tiers).rows["object_refs"] == 0
        assert store.list().unwrap() == [ContentHash.of(payload)]
        # And garbage collection leaves it while it is younger than the grace period, then deletes it
        kept = collect_garbage(p.tiers, grace_s=3600).unwrap()
        assert [h for r in kept for h in r.deleted] == [] and store.list().unwrap() == [ContentHash.of(payload)]
        done = collect_garbage(p.tiers, grace_s=0).unwrap()
        assert [h for r in done for h in r.deleted] == [ContentHash.of(payload).hex] and store.list().unwrap() == []
        # And the same content ingested again is stored again and reads back verified
        fail["armed"] = False
        stored = (await p.ingest(request)).unwrap()
        assert (await p.get(stored.conversation_id)).unwrap().turns[0].response == payload


async def test_gc_racing_ingests_of_the_same_content_loses_nothing(objects_config: DataMeshConfig) -> None:
    failing = {"armed": False}

    def sometimes_fail(step: str, phase: str) -> None:
        if failing["armed"] and step == Step.WRITE_AP and phase == "before":
            raise InjectedFault("compensate this one")

    async with (await IngestionPipeline.create(objects_config, faults=sometimes_fail)).unwrap() as p:
        stop = threading.Event()
        passes = [0]
        deleted: set[str] = set()

        def collector() -> None:  # GC with no grace period, pass after pass, all through the run
            while not stop.is_set():
                for report in collect_garbage(p.tiers, grace_s=0).unwrap():
                    deleted.update(report.deleted)
                passes[0] += 1

        async def gc_passes(count: int) -> None:
            target = passes[0] + count
            while passes[0] < target:
                await asyncio.sleep(0.005)

        def batch(round_: int, payloads: list[bytes]) -> list[IngestionRequest]:
            return [
                IngestionRequest(
                    entity_id=EntityId.generate(),
                    prompt=f"r{round_} {i}".encode(),
                    response=payload,
                    geo_region=GeoRegion.EU_WEST,
                )
                for i, payload in enumerate(payloads)
            ]

        gc_thread = threading.Thread(target=collector)
        gc_thread.start()
        committed, kept, dropped = [], [], []
        try:
            for round_ in range(10):
                # Each round, a saga stores two new blobs and is compensated: both are left unreferenced,
                # GC's to delete.  Then a saga stores the first again, racing GC for it: in even
                # rounds right away, in odd rounds after GC has had time to delete it.
                shared = big(objects_config, f"shared {round_} ".encode())
                alone = big(objects_config, f"alone {round_} ".encode())
                failing["armed"] = True
                results = (await p.ingest_many(batch(round_, [shared, alone]))).unwrap()
                assert all(isinstance(r, Err) for r in results)
                failing["armed"] = False
                if round_ % 2:
                    await gc_passes(2)
                results = (await p.ingest_many(batch(round_, [shared]))).unwrap()
                committed += [r.unwrap().conversation_id for r in results]
                kept.append(ContentHash.of(shared))
                dropped.append(ContentHash.of(alone))
        finally:
            stop.set()
            gc_thread.join()
        # GC did delete blobs while sagas stored the same content, including ones stored again later
        assert passes[0] > 0 and {h.hex for h in kept} & deleted
        # Every committed turn still reads its verified blob
        assert len(committed) == 10
        for conversation_id in committed:
            assert (await p.get(conversation_id)).is_ok()
        # And once GC has run again, exactly the committed content is left
        collect_garbage(p.tiers, grace_s=0).unwrap()
        store = p.tiers.objects.for_region(GeoRegion.EU_WEST).unwrap()
        assert sorted(store.list().unwrap()) == sorted(kept)
        assert not set(dropped) & set(store.list().unwrap())


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
        assert eu.scheme == "file" and "DATAMESH_OBJECTS_URL_EU_WEST" in str(created.error)
        await _a_folder_turned_file_mid_run_compensates_the_saga(objects_config)
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


async def _a_folder_turned_file_mid_run_compensates_the_saga(config: DataMeshConfig) -> None:
    """A filesystem store that breaks after start: the fan-out folder of the payload's key is a file."""
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        payload = big(config, b"blocked ")
        store: Any = p.tiers.objects.for_region(GeoRegion.EU_WEST).unwrap()
        folder = store.path_of(ContentHash.of(payload).hex).parent
        folder.rmdir()
        folder.write_text("a file where a fan-out folder should be")
        request = IngestionRequest(
            entity_id=EntityId.generate(), prompt=b"q", response=payload, geo_region=GeoRegion.EU_WEST
        )
        result = await p.ingest(request)
        assert isinstance(result, Err) and isinstance(result.error, SagaFailed)
        assert result.error.step == Step.STORE_BLOBS and "Not a directory" in result.error.message
        counts = tier_counts(p.tiers)
        assert counts.stored() == 0 and counts.rows["object_refs"] == 0 and counts.rows["idempotency_keys"] == 0
        assert counts.rows["sagas"] == 1 and store.stale_staging() == []
        assert (await p.saga_status(result.error.saga_id)).unwrap() == SagaStatus.COMPENSATED
