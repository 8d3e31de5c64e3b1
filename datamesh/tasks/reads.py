"""Reads routed to a shard's owner: ``read_ap`` on ``ap-read.<region>.<shard>``.

With ``DATAMESH_AP_READS=workers`` a process that does not own the AP shards (the Celery-mode
pipeline, the gateway, the CLI; on any host) sends each shard's part of a read here
(:mod:`datamesh.workers.remote_reads`) and waits for the answer in Celery's result backend.  The
owner answers through :meth:`~datamesh.workers.runtime.Runtime.reader_ap`: its own writer where it
has the shard open, memtable included, so a turn is found as soon as its batch was acknowledged
(no flush waited for); read-only where it has not written the shard since it started.  A read
takes no lease and no writer lock: it changes nothing, and the lease stays with the writes.  One
cost remains in the read-only case of LSM shards: keys not found are waited for as by any reader
of files (the flush interval plus a margin, ``readonly_engine_for``), since a previous owner still
running on the host may hold them unflushed; the owner's queues wait that long too.  Reads follow
the CP tier, which names only keys it committed, so that wait is rare.

How long a read waits in the owner: the owner is one process (``-c 1``, one message reserved at a
time) consuming the write and read queues of its shards.  kombu's Redis transport fetches with one
``BRPOP`` listing those queues in round-robin order and moves the queue it just took a message from
to the end of the order (``queue_order_strategy='round_robin'``, the default: ``_brpop_start`` /
``_brpop_read`` and ``round_robin_cycle.rotate`` in kombu).  So a read waits for the task running
when it arrives, plus at most one message from each other non-empty queue of that process ahead of
``ap-read.<region>.<shard>`` in the order (the next write batch of its shard, another shard's, an
index drain in an ``all`` pool): never for its shard's whole backlog of write batches.

The wire format is JSON (the tasks' only serializer): keys and values travel base64
(:func:`~datamesh.tasks.codec.b64`).  A read the owner could not do comes back as an error value
(``{"error": ..., "retryable": ...}``), not a task failure, so the reader can say what happened.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from celery import shared_task

from datamesh.core.errors import StorageError
from datamesh.core.result import Err, Result
from datamesh.core.types import GeoRegion
from datamesh.tasks.codec import b64, unb64
from datamesh.workers import queues
from datamesh.workers.replies import ANSWER_TASK, Reply
from datamesh.workers.runtime import RUNTIME

GET, SCAN, COUNT = "get", "scan", "count"


@shared_task(name=queues.READ_AP, **ANSWER_TASK)
def read_ap_task(
    *, region: str, shard: int, op: str, keys: list[str] | None = None, prefix: str = "", limit: int | None = None
) -> Reply:
    """Answer one shard's part of a read: ``get`` (``keys``), ``scan`` (``prefix``, ``limit``) or ``count``."""
    store, where = RUNTIME.reader_ap(), GeoRegion(region)
    if op == GET:
        found = store.get_many(where, [unb64(k) for k in keys or []])
        return _reply(found, lambda items: {"found": {b64(k): b64(v) for k, v in items.items()}})
    if op == SCAN:
        scanned = store.scan_prefix(where, unb64(prefix), limit)
        return _reply(scanned, lambda items: {"items": [[b64(k), b64(v)] for k, v in items]})
    if op == COUNT:
        return _reply(store.count_shard(where, shard), lambda n: {"count": n})
    return {"error": f"unknown read operation {op!r}", "retryable": False}


def _reply(result: Result[Any, StorageError], encode: Callable[[Any], Reply]) -> Reply:
    if isinstance(result, Err):
        return {"error": result.error.message, "retryable": result.error.retryable}
    return encode(result.value)
