"""The vector engine once trained (IVF): filtered recall, adaptive probing, crash reconciliation."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from datamesh.core.types import GeoRegion
from datamesh.storage.index import IndexConfig, SearchIndex
from tests.index.conftest import DIM, make_doc


def _clustered(rng: np.random.Generator, n: int) -> np.ndarray:
    centres = rng.standard_normal((40, DIM))
    x = centres[rng.integers(0, 40, n)] + 0.3 * rng.standard_normal((n, DIM))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_trained_index_filters_inside_the_search_with_high_recall(tmp_path: Path) -> None:
    # Given 3,000 vectors over three tenants (one small), trained as IVF from 1,000 vectors on
    config = IndexConfig(dim=DIM, synchronous="NORMAL", train_at=1_000, nprobe=4, exact_below=50)
    index = SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=config).unwrap()
    rng = np.random.default_rng(5)
    x = _clustered(rng, 3_000)
    tenants = ["big"] * 2_000 + ["mid"] * 960 + ["tiny"] * 40
    docs = [make_doc("p", "r", tenant=t, embedding=tuple(map(float, v))) for t, v in zip(tenants, x, strict=True)]
    for start in range(0, len(docs), 500):
        index.add_many(docs[start : start + 500]).unwrap()
    assert index._vectors.is_trained_ivf
    # When each tenant searches, Then every hit is its own and recall@10 against exact search is high
    for tenant in ("big", "mid", "tiny"):
        own = np.asarray([i for i, t in enumerate(tenants) if t == tenant])
        found = 0
        for q in _clustered(rng, 20):
            exact = own[np.argsort(-(x[own] @ q))[:10]]
            hits = index.search(vector=tuple(map(float, q)), tenant=tenant).unwrap()
            assert len(hits) == 10
            got = {h.turn_id for h in hits}
            assert got <= {docs[i].turn_id for i in own}
            found += len(got & {docs[i].turn_id for i in exact})
        assert found / 200 >= 0.9, tenant
    index.close().unwrap()


def test_vectors_added_after_the_last_snapshot_survive_a_crash(tmp_path: Path) -> None:
    config = IndexConfig(dim=DIM, synchronous="NORMAL")
    index = SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=config).unwrap()
    rng = np.random.default_rng(6)
    first = make_doc("a", "b", embedding=tuple(map(float, _clustered(rng, 1)[0])))
    index.add_many([first]).unwrap()
    index.flush().unwrap()
    later = make_doc("c", "d", embedding=tuple(map(float, _clustered(rng, 1)[0])))
    index.add_many([later]).unwrap()
    # When the process dies without a snapshot (we just drop the object), Then reopening reconciles
    index._store.close()
    os.close(index._lock_fd)
    reopened = SearchIndex.open(tmp_path, GeoRegion.EU_WEST, config=config).unwrap()
    assert later.embedding is not None
    assert reopened.search(vector=later.embedding, tenant="acme", limit=1).unwrap()[0].turn_id == later.turn_id
    reopened.close().unwrap()
