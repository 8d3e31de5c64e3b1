"""The index tier: multilingual full text (SQLite FTS5) and vectors (faiss IVF-Flat) per region.

The pipeline calls :class:`RegionalIndexes` / :class:`SearchIndex` (a process that only searches: an
:class:`IndexReader`); nothing else here is public.
"""

from datamesh.storage.index.document import AccessFilter, IndexDocument, IndexQuery, SearchHit
from datamesh.storage.index.embedder import Embedder, MiniLMEmbedder, with_embeddings
from datamesh.storage.index.reader import IndexReader
from datamesh.storage.index.search_index import IndexConfig, RegionalIndexes, SearchIndex

__all__ = [
    "AccessFilter",
    "Embedder",
    "IndexConfig",
    "IndexDocument",
    "IndexQuery",
    "IndexReader",
    "MiniLMEmbedder",
    "RegionalIndexes",
    "SearchHit",
    "SearchIndex",
    "with_embeddings",
]
