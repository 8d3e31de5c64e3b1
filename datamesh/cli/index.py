"""``python -m datamesh index rebuild|status|drain``: the index tier's operator commands.

``rebuild`` re-indexes every active conversation of a region (or of every region) from the AP
tier and the CP tier and removes erased ones; ``status`` shows the index outbox (rows owed, the
oldest row's age, rows failing and their last errors) and each region's indexed turns, read as
``DATAMESH_INDEX_READS`` says (beside the writer: the files read-only, or the search workers);
``drain`` does the outbox's work now.  ``rebuild`` and ``drain`` write the indexes, and a region's
index is open for writing in one process at a time: run them on the index host where no pipeline
or index worker holds it, or they report the index as busy.
"""

from __future__ import annotations

import argparse
from typing import Any

from datamesh.core.config import DataMeshConfig
from datamesh.core.result import Err
from datamesh.core.types import GeoRegion
from datamesh.pipeline import indexer
from datamesh.pipeline.tiers import Tiers, reader_indexes_for
from datamesh.storage.index import Embedder, IndexReader, MiniLMEmbedder, RegionalIndexes


def register(sub: Any) -> None:
    parser = sub.add_parser("index", help="index tier: rebuild a region's indexes, show or drain the outbox")
    parser.add_argument("action", choices=["rebuild", "status", "drain"])
    parser.add_argument("--region", choices=[r.value for r in GeoRegion], help="rebuild: one region (default: all)")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, config: DataMeshConfig) -> int:
    tiers = Tiers.open(config)
    if isinstance(tiers, Err):
        print(f"error: {tiers.error}")
        return 2
    if args.action == "status":
        reader = reader_indexes_for(config)
        try:
            return _status(tiers.value, reader)
        finally:
            reader.close()
            tiers.value.close()
    indexes = RegionalIndexes(config.resolved_index_dir)
    try:
        embedder: Embedder | None = None
        if config.embedder == "minilm":
            loaded = MiniLMEmbedder.load()
            if isinstance(loaded, Err):
                print(f"error: {loaded.error}")
                return 2
            embedder = loaded.value
        if args.action == "drain":
            return _drain(tiers.value, indexes, config, embedder)
        regions = [GeoRegion(args.region)] if args.region else list(GeoRegion)
        return _rebuild(tiers.value, indexes, regions, embedder)
    finally:
        indexes.close()
        tiers.value.close()


def _rebuild(tiers: Tiers, indexes: RegionalIndexes, regions: list[GeoRegion], embedder: Embedder | None) -> int:
    for region in regions:
        done = indexer.rebuild_region(tiers, indexes, region, embedder=embedder)
        if isinstance(done, Err):
            print(f"error: {region.value}: {done.error}")
            return 1
        total = indexes.region(region).unwrap().count().unwrap()
        print(f"{region.value}: {done.value} turns indexed, {total} in the index")
    return 0


def _drain(tiers: Tiers, indexes: RegionalIndexes, config: DataMeshConfig, embedder: Embedder | None) -> int:
    settings = indexer.IndexerSettings(batch=config.index_batch, embedder=embedder)
    done = failed = 0
    while True:
        report = indexer.drain_once(tiers, indexes, settings)
        if isinstance(report, Err):
            print(f"error: {report.error}")
            return 1
        done += report.value.done
        failed += report.value.failed
        for error in report.value.errors:
            print(f"failed: {error}")
        if report.value.claimed < settings.batch:
            break
    print(f"{done} outbox rows done, {failed} failed (retried later)")
    return 1 if failed else 0


def _status(tiers: Tiers, indexes: IndexReader) -> int:
    status = indexer.outbox_status(tiers)
    if isinstance(status, Err):
        print(f"error: {status.error}")
        return 1
    report = status.value
    regions = list(GeoRegion)
    counts = indexes.count_regions(regions)  # read-only (or by the search workers): beside the writer
    print("region         outbox  lag_s     failing  indexed")
    for n, region in enumerate(regions):
        depth = report.regions.get(region.value)
        rows = 0 if depth is None else depth.rows
        failing = 0 if depth is None else depth.failing
        indexed = "?" if isinstance(counts, Err) else "-" if counts.value[n] is None else str(counts.value[n])
        print(f"{region.value:<14} {rows:>6}  {report.lag_s(region.value):>8.1f}  {failing:>7}  {indexed:>7}")
    for op, key, attempts, error in report.worst:
        print(f"retrying {op} {key} after {attempts} attempts: {error}")
    if isinstance(counts, Err):
        print(f"indexed turns unknown: {counts.error}")
    return 0
