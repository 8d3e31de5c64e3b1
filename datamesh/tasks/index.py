"""Index outbox drains as Celery tasks: ``index_drain(region)`` on the region's ``index.<region>`` queue.

The index worker of a region (``python -m datamesh worker --role index --region R``, or ``--role all``)
consumes ``index.<region>`` and keeps that region's :class:`~datamesh.storage.index.RegionalIndexes`
open for writing for its lifetime: it is the region's one index writer.  A drain is enqueued after
every ``commit_cp`` that committed turns, by the pipeline after an erasure, and by beat every
``DATAMESH_INDEX_INTERVAL_S`` per region, so no index work depends on one message: the outbox rows
stay until indexed (:func:`datamesh.pipeline.indexer.drain_once` pushes a failed row back with
backoff), and a drain whose rows failed or whose outbox was unreadable retries with backoff.  A
drain is idempotent; redelivered or duplicate drains find nothing due.

An erase row's index entries are removed here; its AP deletes are handed to the shard's owner
(:mod:`datamesh.tasks.erasure`), since this worker does not write the AP shards.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Iterable

from celery import Celery, Task, shared_task

from datamesh.core.errors import Error, StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.retry import full_jitter_delay
from datamesh.core.types import GeoRegion
from datamesh.observability import logs
from datamesh.pipeline.indexer import drain_once
from datamesh.storage.cp.index_outbox import OutboxRow
from datamesh.workers import queues
from datamesh.workers.runtime import RUNTIME

_RETRY_BASE_S = 0.5
_RETRY_CAP_S = 30.0
#: Retries of one drain message when the outbox cannot be read; past them the next drain takes over
#: (beat enqueues one per region and interval).
_MAX_RETRIES = 20
#: Retries of one drain message whose rows failed: few, since the rows keep their own backoff and
#: every periodic drain takes them again once due (a row failing for hours must not pile up messages).
_MAX_ROW_RETRIES = 3
_MAX_BOUNCES = 1000

log = logs.logger(__name__)


def enqueue_index_drains(app: Celery, regions: Iterable[str], *, countdown: float | None = None) -> None:
    """Publish one ``index_drain`` per region (to ``index.<region>``), to run ``countdown`` seconds from
    now (default: at once); raises what the broker raises."""
    for region in sorted(set(regions)):
        app.send_task(queues.INDEX_DRAIN, kwargs={"region": region}, countdown=countdown)


def _retry(task: Task, reason: str, limit: int = _MAX_RETRIES) -> BaseException | None:
    """A retry to raise, or None when this message has retried enough (the next drain takes over)."""
    if task.request.retries >= limit:
        log.warning("index drain gives up after %d retries (%s); the next drain continues", limit, reason)
        return None
    countdown = full_jitter_delay(task.request.retries + 1, base_s=_RETRY_BASE_S, cap_s=_RETRY_CAP_S)
    retry: BaseException = task.retry(countdown=countdown, max_retries=limit)
    return retry


def hand_off_ap(app: Celery, row: OutboxRow, shard: int) -> Result[None, Error]:
    """Publish an erase row's AP deletes to the shard's queue (``delete_ap``, run by its owner)."""
    kwargs = {"region": row.region, "shard": shard, "row_id": row.id, "op": row.op, "key": row.key}
    try:
        app.send_task(queues.DELETE_AP, kwargs=kwargs)
    except Exception as exc:  # noqa: BLE001 - kombu/redis failures after their retries: one boundary
        return Err(StorageError("broker", "delete_ap", f"could not publish the AP deletes: {exc}", retryable=True))
    return Ok(None)


@shared_task(bind=True, name=queues.INDEX_DRAIN)
def index_drain_task(self: Task, region: str | None = None) -> dict[str, int]:
    """Drain the index outbox of ``region`` (``None``: publish one drain per region and return)."""
    if region is None:
        enqueue_index_drains(self.app, [r.value for r in GeoRegion])
        return {}
    if not RUNTIME.serves(region):  # published to a queue this worker should not consume: put it back
        raise self.retry(countdown=1.0, max_retries=_MAX_BOUNCES, queue=queues.index_queue(region))
    settings = dataclasses.replace(RUNTIME.index_settings(), hand_off_ap=functools.partial(hand_off_ap, self.app))
    totals = {"claimed": 0, "done": 0, "failed": 0, "indexed_turns": 0, "removed_turns": 0}
    deadline = time.monotonic() + RUNTIME.config.step_time_limit_s / 2
    while True:
        report = drain_once(RUNTIME.index_tiers(), RUNTIME.indexes(), settings, regions=[GeoRegion(region)])
        if isinstance(report, Err):
            retry = _retry(self, str(report.error))
            if retry is not None:
                raise retry
            return totals
        for key in totals:
            totals[key] += getattr(report.value, key)
        if report.value.failed:
            # The failed rows are back in the outbox with their own backoff: come back for them.
            retry = _retry(self, str(report.value.errors[-1]), _MAX_ROW_RETRIES)
            if retry is not None:
                raise retry
            return totals
        if report.value.claimed < settings.batch:
            return totals
        if time.monotonic() > deadline:  # more owed than one message should take: continue in another
            enqueue_index_drains(self.app, [region])
            return totals
