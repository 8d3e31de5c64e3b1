"""``python -m datamesh demo``: ingest real conversations, replay some, read one back, report."""

from __future__ import annotations

import asyncio
import json
from importlib import resources
from pathlib import Path
from typing import Any

from datamesh.core.config import DataMeshConfig
from datamesh.core.result import Ok
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest

SAMPLE = "alpaca_eval_gpt4_sample.json"


def register(sub: Any) -> None:
    parser = sub.add_parser("demo", help="ingest a sample of real conversations and show what happened")
    parser.add_argument("--conversations", type=int, default=40, help="how many sample conversations (max 48)")
    parser.set_defaults(handler=lambda args, config: asyncio.run(run(config, args.conversations)))


def load_sample() -> list[dict[str, str]]:
    raw = resources.files("datamesh.demo_data").joinpath(SAMPLE).read_text(encoding="utf-8")
    rows: list[dict[str, str]] = json.loads(raw)
    return rows


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def run(config: DataMeshConfig, count: int) -> int:
    rows = load_sample()[: max(1, min(count, 48))]
    created = await IngestionPipeline.create(config)
    if created.is_err():
        print(f"error: {created.error}")
        return 1
    entities = [EntityId.generate() for _ in range(4)]
    regions = [GeoRegion.EU_WEST, GeoRegion.US_EAST]
    requests = [
        IngestionRequest(
            entity_id=entities[i % len(entities)],
            prompt=row["instruction"].encode(),
            response=row["output"].encode(),
            geo_region=regions[i % len(regions)],
            metadata={"generator": row["generator"], "dataset": row["dataset"]},
        )
        for i, row in enumerate(rows)
    ]
    half = len(requests) // 2
    async with created.unwrap() as p:
        print(f"datamesh demo: {len(rows)} AlpacaEval conversations (gpt4 outputs)")
        latencies: list[float] = []
        ids = []
        for request in requests[:half]:
            result = await p.ingest(request)
            if result.is_err():
                print(f"  ingest failed: {result.error}")
                return 1
            latencies.append(result.unwrap().latency_ms)
            ids.append(result.unwrap().conversation_id)
        print(f"  ingest():      {half} conversations one by one")
        batch = await p.ingest_many(requests[half:])
        if batch.is_err():
            print(f"  ingest_many failed: {batch.error}")
            return 1
        for item in batch.unwrap():
            ids.append(item.unwrap().conversation_id)
        batch_ms = batch.unwrap()[0].unwrap().latency_ms if batch.unwrap() else 0.0
        print(f"  ingest_many(): {len(requests) - half} conversations as one saga in {batch_ms:.1f} ms")

        follow_up = IngestionRequest(
            entity_id=requests[0].entity_id,
            prompt=b"Can you say that more briefly?",
            response=rows[0]["output"].split(".")[0].encode() + b".",
            geo_region=requests[0].geo_region,
            conversation_id=ids[0],
        )
        appended = (await p.ingest(follow_up)).unwrap()
        print(f"  appended turn {appended.turn_seq} to conversation {appended.conversation_id}")

        answers = "\n\n".join(r["output"] for r in rows).encode()
        large = IngestionRequest(
            entity_id=entities[0],
            prompt=b"Repeat every answer you gave today, twice.",
            response=answers * max(2, config.inline_max_bytes // max(1, len(answers)) + 1),
            geo_region=GeoRegion.EU_WEST,
        )
        big = (await p.ingest(large)).unwrap()
        stored = (await p.get(big.conversation_id)).unwrap().turns[0]
        print(
            f"  a {len(large.response) // 1024} KiB response is kept in the {stored.response_location} tier "
            f"(above DATAMESH_INLINE_MAX_BYTES={config.inline_max_bytes}), verified on read"
        )

        replays = requests[:10]
        replayed = [(await p.ingest(r)).unwrap() for r in replays]
        same = sum(1 for r, original in zip(replayed, ids[:10], strict=True) if r.conversation_id == original)
        print(f"  replayed 10 requests: {sum(r.deduplicated for r in replayed)} deduplicated, {same} same ids")

        got = (await p.get(ids[0])).unwrap()
        intact = got.turns[0].prompt == requests[0].prompt and got.turns[0].response == requests[0].response
        print(f"  read back {got.conversation_id}: {len(got.turns)} turns, content verified: {intact}")
        print(f"  prompt: {got.turns[0].prompt.decode()[:70]!r}")
        print(
            f"  latency of ingest(): p50 {_percentile(latencies, 0.5):.2f} ms, "
            f"p99 {_percentile(latencies, 0.99):.2f} ms over {len(latencies)} calls"
        )
        flushed = await p.flush_index()
        words = " ".join(requests[0].prompt.decode().split()[:5])
        hits = await p.search(words, limit=3)
        if isinstance(flushed, Ok) and isinstance(hits, Ok):
            best = hits.value[0].conversation_id if hits.value else None
            print(f"  search({words!r}): {len(hits.value)} hits, best is the first conversation: {best == ids[0]}")
    print("  where the data lives:")
    print(f"    CP tier (metadata, provenance, saga log): {config.resolved_cp_url}")
    print(f"    AP tier (turn content, SQLite WAL shards): {Path(config.resolved_ap_dir).resolve()}/<region>/")
    print(f"    object store (SHA-256 CAS):              {config.resolved_objects_url}/<region>/")
    return 0
