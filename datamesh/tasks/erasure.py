"""An erasure's AP deletes, run by the shard's owner: ``delete_ap`` on ``ap.<region>.<shard>``.

The index worker of a region removes an erased conversation's (or entity's) index entries, then
hands the AP deletes to the shard's queue (:func:`datamesh.tasks.index.hand_off_ap`): a shard has
one writer, fenced by its lease, and only that writer sees every acknowledged record (an LSM
owner's memtable included).  The owner deletes, then deletes the outbox row.  A failure is
recorded on the row, pushed back with backoff, and a drain is scheduled for when it comes due, so
the index worker hands it off again.  A lost message: the row's lease lapses and a later drain
hands it off again.  A duplicate finds the row gone and does nothing.
"""

from __future__ import annotations

from celery import Task, shared_task

from datamesh.core.errors import Error, StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import GeoRegion
from datamesh.observability import logs
from datamesh.pipeline import indexer
from datamesh.storage.cp import index_outbox
from datamesh.tasks.index import enqueue_index_drains
from datamesh.tasks.steps import hold_shard
from datamesh.workers import queues
from datamesh.workers.runtime import RUNTIME

log = logs.logger(__name__)


@shared_task(bind=True, name=queues.DELETE_AP)
def delete_ap_task(self: Task, *, region: str, shard: int, row_id: int, op: str, key: str) -> str:
    """Delete the AP records of erase row ``row_id`` (conversation or entity ``key``) from this
    worker's shard, then settle the row; returns ``done``, ``failed`` or ``gone``."""
    hold_shard(self, region, shard)  # residency, and the shard's lease: only its writer deletes
    tiers = RUNTIME.tiers()
    row = tiers.cp.run(lambda conn: index_outbox.get(conn, row_id), operation="task.delete_ap.row", write=False)
    if isinstance(row, Ok) and row.value is None:
        return "gone"  # settled already: a duplicate message
    deleted: Result[int, Error]
    try:
        RUNTIME.faults("delete_ap", "before")
        deleted = indexer.erase_ap_content(tiers, GeoRegion(region), op, key)
    except Exception as exc:  # noqa: BLE001 - whatever failed is recorded on the row, which is retried
        deleted = Err(StorageError("ap", "delete_ap", f"{type(exc).__name__}: {exc}", retryable=True))
    settings = indexer.IndexerSettings()  # the backoff's defaults; no embedder on an AP worker
    settled = indexer.settle_handed_off(tiers, settings, row_id, deleted)
    if isinstance(settled, Err) or settled.value.failed:
        # Come back once the row is due again: its index drain hands it off anew (beat's periodic
        # drains would too, later).
        attempts = row.value.attempts + 1 if isinstance(row, Ok) and row.value is not None else 1
        enqueue_index_drains(self.app, [region], countdown=indexer.backoff_s(settings, attempts))
        reason = settled.error if isinstance(settled, Err) else settled.value.errors[-1]
        log.warning("erasure AP deletes of %s %s on %s/%d failed: %s", op, key, region, shard, reason)
        return "failed"
    return "done" if settled.value.done else "gone"
