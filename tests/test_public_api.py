"""The public surface is small and frozen: a change here is a deliberate API change."""

from __future__ import annotations

import datamesh.pipeline.ingestion as ingestion
from datamesh.pipeline.request import IngestionRequest


def test_ingestion_exports() -> None:
    assert ingestion.__all__ == ["IngestionPipeline", "IngestionRequest", "IngestionResponse"]


def test_request_fields() -> None:
    assert list(IngestionRequest.__dataclass_fields__) == [
        "entity_id",
        "prompt",
        "response",
        "geo_region",
        "conversation_id",
        "idempotency_key",
        "embedding",
        "metadata",
    ]


def test_pipeline_methods() -> None:
    for name in ("create", "ingest", "ingest_many", "get", "reap", "saga_status", "close", "__aenter__", "__aexit__"):
        assert callable(getattr(ingestion.IngestionPipeline, name))


def test_search_and_erasure_methods() -> None:
    import inspect

    for name in ("search", "erase_conversation", "erase_entity", "flush_index"):
        assert callable(getattr(ingestion.IngestionPipeline, name))
    params = list(inspect.signature(ingestion.IngestionPipeline.search).parameters)
    assert params == ["self", "text", "vector", "entity_id", "region", "since", "until", "limit", "principal"]
