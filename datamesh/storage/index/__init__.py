"""The index tier: multilingual full text (SQLite FTS5) and vectors (faiss IVF-Flat) per region.

The pipeline calls :class:`RegionalIndexes` / :class:`SearchIndex`; nothing else here is public.
"""

from datamesh.storage.index.document import IndexDocument, SearchHit
from datamesh.storage.index.embedder import Embedder, MiniLMEmbedder, with_embeddings
from datamesh.storage.index.search_index import IndexConfig, RegionalIndexes, SearchIndex

__all__ = [
    "Embedder",
    "IndexConfig",
    "IndexDocument",
    "MiniLMEmbedder",
    "RegionalIndexes",
    "SearchHit",
    "SearchIndex",
    "with_embeddings",
]
