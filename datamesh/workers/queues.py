"""Queue names and routing: one place decides where every task goes.

    cp                    CP commits, compensation claims, undo_reserve (global tier)
    reaper                beat's reaper passes, consumed by the cp workers: a queue of its own, so a
                          long cp backlog never holds a reap back past its expiry (the reaper is what
                          settles the sagas that backlog's dead workers left)
    blobs.<region>        object-store writes and their undo, by the region's blob workers
    ap.<region>.<shard>   one queue per AP shard and region (``ap.eu-west.3``): a shard has one writer
                          (its saga writes and undos, and an erasure's deletes)
    ap-read.<region>.<shard>  reads of that shard routed to its owner (``DATAMESH_AP_READS=workers``),
                          consumed by the same process as ``ap.<region>.<shard>``: a queue of their own,
                          so a read does not wait behind the shard's backlog of write batches
    index.<region>        index outbox drains of the region, by its one index worker (the index's writer)
    search.<region>       searches and counts of the region's index (``DATAMESH_INDEX_READS=workers``),
                          by its search workers, which open the index files read-only next to the
                          writer: a queue of their own, so a search never waits behind an index drain

A region's content is only published to that region's queues, so only workers started for the
region (``python -m datamesh worker --region eu-west``) ever write it.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from datamesh.core.types import GeoRegion

CP_QUEUE = "cp"
REAPER_QUEUE = "reaper"

# Task names (stable: they are in messages on the broker).
STORE_BLOBS = "datamesh.store_blobs"
WRITE_AP = "datamesh.write_ap"
COMMIT_CP = "datamesh.commit_cp"
STEP_FAILED = "datamesh.step_failed"
COMPENSATE = "datamesh.compensate"
UNDO_WRITE_AP = "datamesh.undo_write_ap"
UNDO_STORE_BLOBS = "datamesh.undo_store_blobs"
UNDO_RESERVE = "datamesh.undo_reserve"
REAP = "datamesh.reap"
INDEX_DRAIN = "datamesh.index_drain"
DELETE_AP = "datamesh.delete_ap"
READ_AP = "datamesh.read_ap"
QUERY_INDEX = "datamesh.query_index"

ROLES = ("all", "cp", "blobs", "ap", "index", "search")


def blobs_queue(region: str) -> str:
    return f"blobs.{region}"


def ap_queue(region: str, shard: int) -> str:
    return f"ap.{region}.{shard}"


def ap_read_queue(region: str, shard: int) -> str:
    return f"ap-read.{region}.{shard}"


def index_queue(region: str) -> str:
    return f"index.{region}"


def search_queue(region: str) -> str:
    return f"search.{region}"


def route(
    name: str, args: Sequence[Any], kwargs: Mapping[str, Any], options: Mapping[str, Any], **_: Any
) -> dict[str, str]:
    """Celery router (``task_routes``): region and shard come from the task's keyword arguments."""
    if name in (STORE_BLOBS, UNDO_STORE_BLOBS):
        return {"queue": blobs_queue(kwargs["region"])}
    if name in (WRITE_AP, UNDO_WRITE_AP, DELETE_AP):
        return {"queue": ap_queue(kwargs["region"], int(kwargs["shard"]))}
    if name == READ_AP:
        return {"queue": ap_read_queue(kwargs["region"], int(kwargs["shard"]))}
    if name == QUERY_INDEX:
        return {"queue": search_queue(kwargs["region"])}
    if name == REAP:
        return {"queue": REAPER_QUEUE}
    if name == INDEX_DRAIN and kwargs.get("region"):  # without a region: fanned out from the cp queue
        return {"queue": index_queue(kwargs["region"])}
    return {"queue": CP_QUEUE}


def queues_for(role: str, regions: Iterable[str], shards: Iterable[int], *, index: bool = True) -> list[str]:
    """The queues a worker of ``role`` consumes for ``regions`` and (AP) ``shards``.

    ``index=False`` leaves the index tier's queues out of an ``all`` worker: a sharded pool runs a
    process for the index queues (a region's index has one writer process) and one for the search
    queues (a search must not wait behind an index drain).
    """
    regions, shards = list(regions), list(shards)
    names: list[str] = []
    if role in ("all", "cp"):
        names += [CP_QUEUE, REAPER_QUEUE]
    if role in ("all", "blobs"):
        names += [blobs_queue(r) for r in regions]
    if role in ("all", "ap"):
        # A shard's owner consumes its writes and its reads (see the module's docstring).
        names += [name for r in regions for s in shards for name in (ap_queue(r, s), ap_read_queue(r, s))]
    if role == "index" or (role == "all" and index):
        names += [index_queue(r) for r in regions]
    if role == "search" or (role == "all" and index):
        names += [search_queue(r) for r in regions]
    return names


def all_queues(shard_count: int) -> list[str]:
    return queues_for("all", [r.value for r in GeoRegion], range(shard_count))


def depth_labels(name: str) -> tuple[str, str]:
    """``(region, kind)`` of a queue for ``datamesh_queue_depth``: shards summed, a closed label set."""
    kind, _, rest = name.partition(".")
    region = rest.split(".", 1)[0] if rest else "global"
    return region, kind
