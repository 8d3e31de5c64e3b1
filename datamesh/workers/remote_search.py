"""Regional indexes searched through their search workers (``DATAMESH_INDEX_READS=workers``), from any host.

A process that does not write the indexes (the Celery-mode pipeline, the gateway, the CLI) gets a
:class:`RemoteIndexes` as its :class:`~datamesh.storage.index.IndexReader`: it opens no index file.
Each region's part of a search (or a count) is a ``query_index`` task on ``search.<region>``, run by
that region's search workers next to the index files (:mod:`datamesh.tasks.search`); the answers
come back through Celery's result backend (:mod:`datamesh.workers.replies`).  The regions of one
search are asked at once and waited for together, so a search takes as long as its slowest region,
not their sum.

A search waits ``DATAMESH_SEARCH_TIMEOUT_S`` for every answer (one deadline for all its regions);
past it (no worker consumes a region's queue: its search pool is down, or not started for that
region) it fails with a retryable ``StorageError`` naming the region and the queue, which the gateway
answers with 503.  Every region searched needs a search worker: with no ``region`` in the query that
is every region, as every region may hold an index.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from celery.result import AsyncResult

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import StorageError, ValidationError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import GeoRegion
from datamesh.storage.index import IndexQuery, SearchHit
from datamesh.tasks.search import COUNT, SEARCH, decode_hits, encode_query
from datamesh.workers import queues
from datamesh.workers.replies import NoAnswer, Replies, Reply


class RemoteIndexes:
    """An :class:`~datamesh.storage.index.IndexReader` whose regions answer from their search workers."""

    def __init__(self, config: DataMeshConfig) -> None:
        self.config = config
        self._replies = Replies(config)

    def search_regions(
        self, regions: Sequence[GeoRegion], query: IndexQuery
    ) -> Result[list[list[SearchHit]], ValidationError | StorageError]:
        asked = self._ask(regions, "search", {"op": SEARCH, "query": encode_query(query)})
        if isinstance(asked, Err):
            return Err(asked.error)
        out: list[list[SearchHit]] = []
        for reply in asked.value:
            if "invalid" in reply:  # the index refused the query, as it would locally
                return Err(ValidationError(reply["invalid"], reply["message"]))
            out.append(decode_hits(reply["hits"]))
        return Ok(out)

    def count_regions(self, regions: Sequence[GeoRegion]) -> Result[list[int | None], StorageError]:
        asked = self._ask(regions, "count", {"op": COUNT})
        if isinstance(asked, Err):
            return asked
        return Ok([reply["count"] for reply in asked.value])

    def _ask(self, regions: Sequence[GeoRegion], operation: str, args: Reply) -> Result[list[Reply], StorageError]:
        """Every region's answer, asked at once and waited for until one deadline."""
        timeout = self.config.search_timeout_s
        deadline = time.monotonic() + timeout
        hint = "is a search worker running for that region (worker --role search)?"
        sent: list[tuple[str, AsyncResult]] = []
        try:
            for region in regions:
                where = f"{region.value} (queue {queues.search_queue(region.value)})"
                what = f"a {operation} of {where}"
                task = self._replies.send(
                    queues.QUERY_INDEX, {"region": region.value, **args}, what=what, timeout=timeout
                )
                sent.append((where, task))
            replies = []
            while sent:
                where, task = sent.pop(0)
                what, who = f"a {operation} of {where}", f"the search worker of {where}"
                replies.append(
                    self._replies.wait(task, what=what, who=who, hint=hint, timeout=timeout, deadline=deadline)
                )
        except NoAnswer as exc:
            return Err(StorageError("index", operation, exc.message, retryable=exc.retryable))
        finally:
            for _, task in sent:  # questions not waited for (an earlier one failed): stop listening
                self._replies.forget(task)
        return Ok(replies)

    def close(self) -> Result[None, StorageError]:
        self._replies.close()
        return Ok(None)
