"""Helpers for tests: real conversation data and whole-tier inspections."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from sqlalchemy import func, select

from datamesh.core.types import EntityId, GeoRegion
from datamesh.models.tables import Base
from datamesh.pipeline.ingestion import IngestionRequest
from datamesh.pipeline.tiers import Tiers

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@cache
def alpaca(model: str = "gpt4") -> list[dict[str, str]]:
    """AlpacaEval outputs from ../shared/data (read-only)."""
    path = SHARED_DATA / "alpaca_eval" / f"{model}.json"
    rows: list[dict[str, str]] = json.loads(path.read_text(encoding="utf-8"))
    return rows


def real_requests(
    n: int, *, region: GeoRegion = GeoRegion.EU_WEST, entities: int = 4, model: str = "gpt4"
) -> list[IngestionRequest]:
    owners = [EntityId.generate() for _ in range(entities)]
    return [
        IngestionRequest(
            entity_id=owners[i % entities],
            prompt=row["instruction"].encode(),
            response=row["output"].encode(),
            geo_region=region,
        )
        for i, row in enumerate(alpaca(model)[:n])
    ]


@dataclass(frozen=True)
class TierCounts:
    """How much every tier holds: used to prove nothing was written, lost or orphaned."""

    rows: dict[str, int]
    ap_rows: int
    blobs: int

    def stored(self) -> int:
        return self.rows["conversations"] + self.rows["turns"] + self.ap_rows + self.blobs


def tier_counts(tiers: Tiers, *, object_regions: tuple[GeoRegion, ...] = tuple(GeoRegion)) -> TierCounts:
    def count_all(conn: object) -> dict[str, int]:
        return {
            name: int(conn.execute(select(func.count()).select_from(table)).scalar_one())  # type: ignore[attr-defined]
            for name, table in Base.metadata.tables.items()
        }

    rows = tiers.cp.run(count_all, operation="test.count", write=False).unwrap()
    ap_rows = sum(tiers.ap.count(region).unwrap() for region in GeoRegion)
    blobs = 0
    for region in object_regions:
        store = tiers.objects.for_region(region)
        if store.is_ok():
            blobs += len(store.unwrap().list().unwrap())
    return TierCounts(rows, ap_rows, blobs)


def counts_after_gc(tiers: Tiers, *, object_regions: tuple[GeoRegion, ...] = tuple(GeoRegion)) -> TierCounts:
    """:func:`tier_counts` once garbage collection (no grace period) has deleted unreferenced blobs.

    A compensation only drops references: the blobs it leaves are GC's to delete, and an orphan is a
    blob that even GC leaves behind with nothing referencing it.
    """
    from datamesh.pipeline.gc import collect_garbage

    collect_garbage(tiers, grace_s=0).unwrap()
    return tier_counts(tiers, object_regions=object_regions)
