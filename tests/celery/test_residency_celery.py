"""Residency on Celery: a region's content is written only by workers started for that region."""

from __future__ import annotations

from typing import Any

from celery.app.routes import prepare as prepare_routes

from datamesh.core.config import DataMeshConfig
from datamesh.core.types import ContentHash, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.storage.ap.store import shard_for
from datamesh.workers import queues
from datamesh.workers.executor import CeleryExecutor
from tests.celery.conftest import Workers, runs_per_node
from tests.helpers import real_requests

REGIONS = (GeoRegion.EU_WEST, GeoRegion.US_EAST)


def _ap_runs(executor: CeleryExecutor) -> dict[str, int]:
    """How many ``write_ap`` runs each worker node reports (its own count since it started)."""
    return runs_per_node(executor.app, queues.WRITE_AP)


def _parts(requests: list[Any], shards: int) -> int:
    return len({shard_for(r.entity_id.value.bytes, shards) for r in requests})


async def test_each_regions_content_is_written_by_its_own_workers_even_when_misrouted(
    workers: Workers, celery_config: DataMeshConfig
) -> None:
    # Given one pool started for eu-west and one for us-east
    workers.start("--role", "all", "--region", "eu-west", "--name", "eu")
    workers.start("--role", "all", "--region", "us-east", "--name", "us")
    workers.wait_ready(count=2)
    async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
        executor = p._executor
        assert isinstance(executor, CeleryExecutor)
        shards = celery_config.ap_shards
        eu, us = (real_requests(6, region=region, entities=6) for region in REGIONS)
        # When a batch of both regions' turns is ingested
        assert all(r.is_ok() for r in (await p.ingest_many(eu + us)).unwrap())
        # Then each region's shard writes ran on that region's pool only
        assert _ap_runs(executor) == {"eu": _parts(eu, shards), "us": _parts(us, shards)}
        # When a US saga's first write is misrouted onto an EU shard queue (a routing bug, a rolling deploy)
        real_route = queues.route

        def misroute(name: str, args: Any, kwargs: Any, options: Any, **kw: Any) -> Any:
            if name == queues.WRITE_AP and kwargs.get("region") == "us-east":
                return {"queue": queues.ap_queue("eu-west", 0)}
            return real_route(name, args, kwargs, options, **kw)

        router = executor.app.amqp.router
        kept = list(router.routes)
        router.routes[:] = prepare_routes((misroute,))
        try:
            more_us = real_requests(6, region=GeoRegion.US_EAST, entities=1)
            stored = (await p.ingest_many(more_us)).unwrap()
        finally:
            router.routes[:] = kept
        # Then the EU pool hands it back untouched and the US pool writes it; the turns read back
        assert all(r.is_ok() for r in stored)
        runs = _ap_runs(executor)
        assert runs == {"eu": _parts(eu, shards) + 1, "us": _parts(us, shards) + 1}, runs
        for request, result in zip(more_us, stored, strict=True):
            turn = (await p.get(result.unwrap().conversation_id)).unwrap().turns[0]
            assert turn.response == request.response

        # When a US saga's blob write is misrouted onto the EU blobs queue
        def misroute_blobs(name: str, args: Any, kwargs: Any, options: Any, **kw: Any) -> Any:
            if name == queues.STORE_BLOBS and kwargs.get("region") == "us-east":
                return {"queue": queues.blobs_queue("eu-west")}
            return real_route(name, args, kwargs, options, **kw)

        large = b"us only " * (celery_config.inline_max_bytes // 8 + 1)
        owner = real_requests(1, region=GeoRegion.US_EAST)[0].entity_id
        turn_request = IngestionRequest(entity_id=owner, prompt=b"q", response=large, geo_region=GeoRegion.US_EAST)
        router.routes[:] = prepare_routes((misroute_blobs,))
        try:
            blob_turn = (await p.ingest(turn_request)).unwrap()
        finally:
            router.routes[:] = kept
        # Then the EU pool sends it back to the US queue, and the blob lands in the US store only
        key = ContentHash.of(large)
        assert p.tiers.objects.for_region(GeoRegion.US_EAST).unwrap().exists(key).unwrap()
        assert not p.tiers.objects.for_region(GeoRegion.EU_WEST).unwrap().exists(key).unwrap()
        assert (await p.get(blob_turn.conversation_id)).unwrap().turns[0].response == large
        blob_runs = runs_per_node(executor.app, queues.STORE_BLOBS)
        assert blob_runs["eu"] >= 1 and blob_runs["us"] >= 1, blob_runs
