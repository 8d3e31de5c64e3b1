"""``python -m datamesh objects verify|gc``: scrub the object stores, collect garbage."""

from __future__ import annotations

import argparse
from typing import Any

from datamesh.core.config import DataMeshConfig
from datamesh.core.result import Err
from datamesh.pipeline.gc import DEFAULT_GC_GRACE_S, collect_garbage, scrub
from datamesh.pipeline.tiers import Tiers


def register(sub: Any) -> None:
    parser = sub.add_parser("objects", help="object store maintenance: verify (scrub) or gc")
    parser.add_argument("action", choices=["verify", "gc"])
    parser.add_argument("--grace-s", type=float, default=DEFAULT_GC_GRACE_S, help="gc: keep blobs younger than this")
    parser.add_argument("--dry-run", action="store_true", help="gc: report what would be deleted")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, config: DataMeshConfig) -> int:
    tiers = Tiers.open(config)
    if isinstance(tiers, Err):
        print(f"error: {tiers.error}")
        return 2
    try:
        return _verify(tiers.value) if args.action == "verify" else _gc(tiers.value, args.grace_s, args.dry_run)
    finally:
        tiers.value.close()


def _verify(tiers: Tiers) -> int:
    reports = scrub(tiers)
    if isinstance(reports, Err):
        print(f"error: {reports.error}")
        return 1
    bad = 0
    for region, report in reports.value.items():
        for key in report.corrupt:
            print(f"CORRUPT {region.value} {key}")
        for key in report.missing:
            print(f"MISSING {region.value} {key}")
        for key, error in report.failed:
            print(f"UNREADABLE {region.value} {key}: {error}")
        bad += len(report.corrupt) + len(report.missing) + len(report.failed)
        print(f"{region.value}: {report.checked} objects, {report.bytes_checked} bytes checked")
    print(f"{bad} problems found")
    return 1 if bad else 0


def _gc(tiers: Tiers, grace_s: float, dry_run: bool) -> int:
    reports = collect_garbage(tiers, grace_s=grace_s, dry_run=dry_run)
    if isinstance(reports, Err):
        print(f"error: {reports.error}")
        return 1
    verb = "would delete" if dry_run else "deleted"
    for r in reports.value:
        print(f"{r.region.value}: {r.examined} old enough, {len(r.deleted)} {verb}, staging swept {r.staging_swept}")
    return 0
