"""Worker processes for the CP concurrency tests (imported by spawned children, so module level).

Each worker opens its own database handles (nothing is shared across the process boundary but
the PostgreSQL server), waits for the common start signal, then writes as fast as it can.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from datamesh.core.config import DataMeshConfig
from datamesh.core.types import ConversationId, EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.storage.cp import provenance
from datamesh.storage.cp.database import CpDatabase
from datamesh.storage.cp.sql import utcnow


def append_turns(
    worker: int,
    cp_url: str,
    data_dir: str,
    targets: list[tuple[str, str]],
    turns: int,
    start: Any,
    results: Any,
) -> None:
    """Append ``turns`` turns round-robin to ``targets`` ((conversation id, entity id)) via the pipeline."""

    async def main() -> dict[str, Any]:
        config = DataMeshConfig(data_dir=Path(data_dir), cp_url=cp_url)
        async with (await IngestionPipeline.create(config)).unwrap() as p:
            start.wait(60)
            done: list[tuple[str, str, int, str]] = []
            for i in range(turns):
                conversation, entity = targets[(i + worker) % len(targets)]
                key = f"w{worker}-t{i}"
                request = IngestionRequest(
                    entity_id=EntityId.parse(entity).unwrap(),
                    prompt=f"worker {worker} turn {i}".encode(),
                    response=b"ok",
                    geo_region=GeoRegion.EU_WEST,
                    conversation_id=ConversationId.parse(conversation).unwrap(),
                    idempotency_key=key,
                )
                response = (await p.ingest(request)).unwrap()
                done.append((str(response.conversation_id), str(response.turn_id), response.turn_seq, key))
            return {"worker": worker, "done": done, "stats": p.tiers.cp.stats.snapshot()}

    try:
        results.put(asyncio.run(main()))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        results.put({"worker": worker, "error": repr(exc)})


def append_events(worker: int, cp_url: str, conversation_id: str, events: int, start: Any, results: Any) -> None:
    """Append ``events`` derived-artifact events to one chain, each in its own transaction."""
    try:
        db = CpDatabase.open(cp_url).unwrap()
        start.wait(60)
        appended: list[tuple[int, str]] = []
        for i in range(events):
            kind, body = provenance.derived_artifact("embedding", model=f"model-w{worker}-{i}")
            appended.append(
                db.run(
                    lambda c, k=kind, b=body: provenance.append(c, conversation_id, k, b, now=utcnow()),
                    operation="test.append_event",
                    retry_unique_violation=True,
                ).unwrap()
            )
        results.put({"worker": worker, "done": appended, "stats": db.stats.snapshot()})
        db.dispose()
    except BaseException as exc:  # noqa: BLE001
        results.put({"worker": worker, "error": repr(exc)})
