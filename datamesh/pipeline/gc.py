"""Garbage collection of object-store blobs, and the scrub of every region's store.

A blob is deleted only when no saga — committed or in flight — references it in the CP tier *and*
it was last written before the grace period.  References are recorded before a saga writes its
blob and deletion happens with the blob's CP row locked (see ``storage/cp/object_refs.py``), so the
grace period is a second guard, for blobs written without a reference (a redelivered step after
its saga was compensated, a crash between write and record).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from typing import Any

from sqlalchemy.engine import Connection

from datamesh.core.errors import StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import ContentHash, GeoRegion
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.cp import object_refs
from datamesh.storage.cp.sql import utcnow
from datamesh.storage.objects.scrub import ScrubReport, scrub_store

DEFAULT_GC_GRACE_S = 3600.0
#: Staged (unpublished) writes are swept only when older than this, whatever the blob grace: a
#: large upload in flight must never lose its staging file.
DEFAULT_STAGING_GRACE_S = 6 * 3600.0
_BATCH = 200


class _DeleteFailed(Exception):
    pass


@dataclass(slots=True)
class GcReport:
    region: GeoRegion
    examined: int = 0
    referenced: int = 0
    deleted: list[str] = field(default_factory=list)
    staging_swept: int = 0


def collect_garbage(
    tiers: Tiers,
    *,
    grace_s: float = DEFAULT_GC_GRACE_S,
    staging_grace_s: float = DEFAULT_STAGING_GRACE_S,
    dry_run: bool = False,
) -> Result[list[GcReport], StorageError]:
    """Delete unreferenced blobs older than ``grace_s`` in every region; ``dry_run`` only reports."""
    now = utcnow()
    cutoff = now - timedelta(seconds=grace_s)
    staging_cutoff = now - timedelta(seconds=max(grace_s, staging_grace_s))
    reports: list[GcReport] = []
    for region in tiers.objects.regions:
        store = tiers.objects.for_region(region).unwrap()
        report = GcReport(region)
        old = store.list_with_mtime(older_than=cutoff)
        if isinstance(old, Err):
            return old
        hashes = [h.hex for h, _ in old.value]
        report.examined = len(hashes)
        for start in range(0, len(hashes), _BATCH):
            chunk = hashes[start : start + _BATCH]
            done = _collect_chunk(tiers, store, region, chunk, dry_run)
            if isinstance(done, Err):
                return done
            report.deleted.extend(done.value)
        report.referenced = report.examined - len(report.deleted)
        if not dry_run:
            swept = store.sweep_staging(older_than=staging_cutoff)
            if isinstance(swept, Err):
                return swept
            report.staging_swept = swept.value
        reports.append(report)
    return Ok(reports)


def _collect_chunk(
    tiers: Tiers, store: Any, region: GeoRegion, chunk: list[str], dry_run: bool
) -> Result[list[str], StorageError]:
    def delete_blob(_region: str, content_hash: str) -> None:
        if dry_run:
            return
        deleted = store.delete(ContentHash(content_hash))
        if isinstance(deleted, Err):
            raise _DeleteFailed(str(deleted.error))

    def tx(conn: Connection) -> list[str]:
        if dry_run:
            live = object_refs.referenced(conn, region.value, chunk)
            return [h for h in chunk if h not in live]
        return [h for _, h in object_refs.collect(conn, [(region.value, h) for h in chunk], delete_blob)]

    try:
        return tiers.cp.run(tx, operation="objects.gc", write=not dry_run)
    except _DeleteFailed as exc:
        return Err(StorageError("objects", "gc", str(exc), retryable=True))


def scrub(tiers: Tiers) -> Result[dict[GeoRegion, ScrubReport], StorageError]:
    """Verify every object of every region; committed references that are absent are ``missing``."""
    reports: dict[GeoRegion, ScrubReport] = {}
    for region in tiers.objects.regions:
        store = tiers.objects.for_region(region).unwrap()
        expected = tiers.cp.run(
            partial(object_refs.committed_hashes, region=region.value), operation="objects.scrub", write=False
        )
        if isinstance(expected, Err):
            return expected
        report = scrub_store(store, expected=[ContentHash(h) for h in expected.value])
        if isinstance(report, Err):
            return report
        reports[region] = report.value
    return Ok(reports)
