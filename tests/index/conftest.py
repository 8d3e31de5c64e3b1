"""Fixtures for the index tier: a fresh index root per test and document builders."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest

from datamesh.core.types import ConversationId, EntityId, GeoRegion, TurnId
from datamesh.storage.index import IndexConfig, IndexDocument, SearchIndex

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "alpaca_eval"
if not DATA.exists():
    DATA = Path("/work/shared/data/alpaca_eval")
MODELS = ("claude", "gpt4", "llama-2-70b-chat-hf")
T0 = datetime(2026, 1, 1, tzinfo=UTC)
DIM = 16


def make_doc(
    prompt: str,
    response: str = "",
    *,
    tenant: str = "acme",
    entity: EntityId | None = None,
    region: GeoRegion = GeoRegion.EU_WEST,
    conversation: ConversationId | None = None,
    minutes: int = 0,
    embedding: tuple[float, ...] | None = None,
) -> IndexDocument:
    return IndexDocument(
        conversation_id=conversation or ConversationId.generate(),
        turn_id=TurnId.generate(),
        tenant=tenant,
        entity_id=entity or EntityId.generate(),
        region=region,
        created_at=T0 + timedelta(minutes=minutes),
        prompt=prompt,
        response=response,
        embedding=embedding,
    )


def random_vector(rng: np.random.Generator, dim: int = DIM) -> tuple[float, ...]:
    v = rng.standard_normal(dim)
    return tuple(float(x) for x in v / np.linalg.norm(v))


@pytest.fixture
def index(tmp_path: Path) -> Iterator[SearchIndex]:
    """Given an empty EU-West index with 16-dimensional vectors."""
    opened = SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=IndexConfig(dim=DIM, synchronous="NORMAL"))
    idx = opened.unwrap()
    yield idx
    idx.close()


def load_alpaca(model: str) -> list[dict[str, str]]:
    path = DATA / f"{model}.json"
    if not path.exists():
        pytest.skip(f"real data not found at {path}")
    rows: list[dict[str, str]] = json.loads(path.read_text())
    return rows
