"""Corrupted content is reported as IntegrityError, never returned as data."""

from __future__ import annotations

import sqlite3

from sqlalchemy import text

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import IntegrityError
from datamesh.core.result import Err
from datamesh.core.types import ContentHash, EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.storage.cp import provenance
from datamesh.storage.objects.filesystem import FilesystemObjectStore


async def test_corrupted_ap_content_is_an_integrity_error(config: DataMeshConfig) -> None:
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        request = IngestionRequest(
            entity_id=EntityId.generate(),
            prompt=b"original prompt",
            response=b"original answer",
            geo_region=GeoRegion.EU_WEST,
        )
        done = (await p.ingest(request)).unwrap()
        shard = p.tiers.ap.shard_path(GeoRegion.EU_WEST, p.tiers.ap.shard_of(request.entity_id)).with_suffix(".sqlite3")
        p.tiers.ap.close()  # release the writer; reopened lazily on the next read
        with sqlite3.connect(shard) as db:
            (value,) = db.execute("SELECT value FROM kv").fetchone()
            db.execute("UPDATE kv SET value = ?", (bytes(value).replace(b"original answer", b"tampered answer"),))
        result = await p.get(done.conversation_id)
        assert isinstance(result, Err) and isinstance(result.error, IntegrityError)
        assert result.error.expected == ContentHash.of(b"original answer").hex


async def test_corrupted_blob_is_an_integrity_error(config: DataMeshConfig) -> None:
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        big = b"z" * (config.inline_max_bytes + 100)
        request = IngestionRequest(
            entity_id=EntityId.generate(), prompt=b"q", response=big, geo_region=GeoRegion.US_WEST
        )
        done = (await p.ingest(request)).unwrap()
        store = p.tiers.objects.for_region(GeoRegion.US_WEST).unwrap()
        assert isinstance(store, FilesystemObjectStore)
        path = store.path_of(ContentHash.of(big).hex)
        path.write_bytes(b"z" * (len(big) - 1) + b"!")
        result = await p.get(done.conversation_id)
        assert isinstance(result, Err) and isinstance(result.error, IntegrityError)


async def test_provenance_verifier_names_the_first_broken_link(config: DataMeshConfig) -> None:
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        entity = EntityId.generate()
        first = (
            await p.ingest(IngestionRequest(entity_id=entity, prompt=b"a", response=b"b", geo_region=GeoRegion.EU_WEST))
        ).unwrap()
        for i in range(3):
            follow = IngestionRequest(
                entity_id=entity,
                prompt=f"n{i}".encode(),
                response=b"r",
                geo_region=GeoRegion.EU_WEST,
                conversation_id=first.conversation_id,
            )
            (await p.ingest(follow)).unwrap()
        cid = str(first.conversation_id)
        checked, broken = p.tiers.cp.run(lambda c: provenance.verify(c, cid), operation="t").unwrap()
        assert checked == 8 and broken is None

        def tamper(conn: object) -> None:
            conn.execute(  # type: ignore[attr-defined]
                text(
                    "UPDATE provenance_records SET body = replace(body, :old, :new)"
                    " WHERE conversation_id = :c AND seq = 4"
                ),
                {"c": cid, "old": '"turn_seq":2', "new": '"turn_seq":9'},
            )

        p.tiers.cp.run(tamper, operation="t").unwrap()
        _, broken = p.tiers.cp.run(lambda c: provenance.verify(c, cid), operation="t").unwrap()
        assert broken is not None and broken.seq == 4 and broken.reason == "record content changed"
