"""What a process that searches the index tier without writing it needs: :class:`IndexReader`.

Two implementations: :class:`~datamesh.storage.index.search_index.RegionalIndexes` opened
``readonly`` on the index files (``DATAMESH_INDEX_READS=files``: the process runs where the files
are), and :class:`~datamesh.workers.remote_search.RemoteIndexes`, which asks each region's search
workers over the broker (``workers``: from any host).  Both answer alike: a region that has no index
yet has no hits (and no count), and hits are the regional index's own, in its order.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from datamesh.core.errors import StorageError, ValidationError
from datamesh.core.result import Result
from datamesh.core.types import GeoRegion
from datamesh.storage.index.document import IndexQuery, SearchHit


class IndexReader(Protocol):
    """Searches and counts over regional indexes this process does not write."""

    def search_regions(
        self, regions: Sequence[GeoRegion], query: IndexQuery
    ) -> Result[list[list[SearchHit]], ValidationError | StorageError]:
        """Each region's best ``query.limit`` hits, in the order of ``regions`` (empty: no index there).

        ``Err(ValidationError)`` for a query an index refuses (no searchable characters, a vector
        of the wrong size); ``Err(StorageError)`` when a region could not be searched.
        """
        ...

    def count_regions(self, regions: Sequence[GeoRegion]) -> Result[list[int | None], StorageError]:
        """How many turns each region's index holds (``None``: that region has no index)."""
        ...

    def close(self) -> Result[None, StorageError]: ...


__all__ = ["IndexReader"]
