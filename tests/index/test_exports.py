"""The index tier's public surface is frozen: changing it is a deliberate act."""

import datamesh.storage.index as index_tier


def test_public_api() -> None:
    assert sorted(index_tier.__all__) == [
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
