"""Vector engine: faiss IVF-Flat keyed by document rowid, filtered inside the search.

Chosen by measurement (``bench/bench_index.py --candidates``): IVF-Flat builds two orders of magnitude
faster than HNSW on this machine, removes vectors for real (``remove_ids`` deletes them from the
inverted lists: erasure leaves no copy in memory, and none on disk once the snapshot is rewritten), and
its filtered search degrades gracefully.  HNSW libraries either lack a filter (usearch's Python API)
or call back into Python per visited node (hnswlib), and cannot free a removed vector.

Access filtering happens *inside* the search: the caller's filter (tenant, entities, time range) is
evaluated on in-memory metadata columns indexed by rowid, turned into a bitmap, and handed to faiss as
an ``IDSelectorBitmap``; faiss skips every id outside it while scanning, so the top-k is the top-k of
the allowed vectors only: no fixed top-k is post-filtered, and neither ranks nor counts of other
tenants' vectors can leak.  When few vectors are allowed (``exact_below``), every list is scanned,
which is exact.  Below ``train_at`` vectors the index is an exact flat index (IVF needs data to train
its centroids); it is retrained when it has grown ``RETRAIN_FACTOR`` times since the last training.

Vectors are L2-normalised; scores are cosine similarities.  The snapshot ``vectors.faiss`` is
reconciled with the SQLite rows at open (ids missing are added, ids no longer present are removed),
so a crash between the SQLite commit and the snapshot loses nothing.  Raises ``RuntimeError``
(faiss) and ``OSError``; the facade translates them.
"""

from __future__ import annotations

import importlib
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from datamesh.core.durable import fsync_dir
from datamesh.storage.index.document import AccessFilter
from datamesh.storage.index.fulltext import FullTextStore, VectorRow

faiss: Any = importlib.import_module("faiss")

DEFAULT_TRAIN_AT = 20_000
DEFAULT_NPROBE = 24
DEFAULT_EXACT_BELOW = 5_000
RETRAIN_FACTOR = 4
TRAIN_POINTS_PER_LIST = 40

F32 = npt.NDArray[np.float32]


class _Columns:
    """Access fields per rowid, as numpy columns, for building search bitmaps without SQL."""

    def __init__(self) -> None:
        self.tenant = np.full(0, -1, dtype=np.int32)
        self.entity = np.full(0, -1, dtype=np.int32)
        self.created = np.zeros(0, dtype=np.int64)
        self.alive = np.zeros(0, dtype=bool)
        self.tenant_codes: dict[str, int] = {}
        self.entity_codes: dict[str, int] = {}
        self.count = 0

    def _grow(self, size: int) -> None:
        if size <= len(self.alive):
            return
        new = max(size, 2 * len(self.alive), 1024)
        extra = new - len(self.alive)
        self.tenant = np.concatenate([self.tenant, np.full(extra, -1, dtype=np.int32)])
        self.entity = np.concatenate([self.entity, np.full(extra, -1, dtype=np.int32)])
        self.created = np.concatenate([self.created, np.zeros(extra, dtype=np.int64)])
        self.alive = np.concatenate([self.alive, np.zeros(extra, dtype=bool)])

    def put(self, rows: Sequence[VectorRow]) -> None:
        if not rows:
            return
        self._grow(max(r.rowid for r in rows) + 1)
        for r in rows:
            if not self.alive[r.rowid]:
                self.count += 1
            self.tenant[r.rowid] = self.tenant_codes.setdefault(r.tenant, len(self.tenant_codes))
            self.entity[r.rowid] = self.entity_codes.setdefault(r.entity_id, len(self.entity_codes))
            self.created[r.rowid] = r.created_us
            self.alive[r.rowid] = True

    def drop(self, rowids: Sequence[int]) -> None:
        for rowid in rowids:
            if rowid < len(self.alive) and self.alive[rowid]:
                self.alive[rowid] = False
                self.count -= 1

    def mask(self, access: AccessFilter) -> npt.NDArray[np.bool_]:
        """True for exactly the rowids the caller may see."""
        code = self.tenant_codes.get(access.tenant)
        if code is None:
            return np.zeros(len(self.alive), dtype=bool)
        mask = self.alive & (self.tenant == code)
        entities = access.entity_strings()
        if entities is not None:
            codes = [self.entity_codes[e] for e in entities if e in self.entity_codes]
            mask &= np.isin(self.entity, np.asarray(codes, dtype=np.int32)).astype(bool)
        since, until = access.since_us(), access.until_us()
        if since is not None:
            mask &= self.created >= since
        if until is not None:
            mask &= self.created < until
        result: npt.NDArray[np.bool_] = mask
        return result


def _matrix(rows: Sequence[VectorRow], dim: int) -> F32:
    return np.frombuffer(b"".join(r.embedding for r in rows), dtype=np.float32).reshape(len(rows), dim)


class VectorIndex:
    """Filtered nearest-neighbour search over one region's embeddings, keyed by document rowid."""

    def __init__(
        self,
        path: Path,
        dim: int,
        store: FullTextStore,
        *,
        train_at: int = DEFAULT_TRAIN_AT,
        nprobe: int = DEFAULT_NPROBE,
        exact_below: int = DEFAULT_EXACT_BELOW,
    ) -> None:
        self.path = path
        self.dim = dim
        self._store = store
        self.train_at = train_at
        self.nprobe = nprobe
        self.exact_below = exact_below
        self.columns = _Columns()
        self._index: Any = self._empty_flat()
        self._dirty = False

    # -- lifecycle ---------------------------------------------------------------------------------

    def open(self) -> None:
        """Load the snapshot (if any) and reconcile it with the rows the SQLite file holds."""
        for batch in self._store.vector_rows(with_vectors=False):
            self.columns.put(batch)
        if self.path.exists():
            index = faiss.read_index(str(self.path))
            if index.d != self.dim:
                raise RuntimeError(f"snapshot has {index.d} dimensions, index configured for {self.dim}")
            self._index = index
        self.reconcile()

    def reconcile(self) -> None:
        """Make the in-memory index hold exactly the vectors the SQLite file holds (nothing saved).

        At open it repairs a stale snapshot; a read-only index calls it again whenever the writer
        has committed, so it follows the writer's additions and removals.
        """
        have = self._ids_in_index()
        want = np.asarray(sorted(self._store.vector_ids()), dtype=np.int64)
        stale = np.setdiff1d(have, want)
        missing = np.setdiff1d(want, have)
        if len(stale):
            self.columns.drop([int(i) for i in stale])
            self._index.remove_ids(stale)
            self._dirty = True
        for start in range(0, len(missing), 20_000):
            rows = self._store.vector_rows_by_id([int(i) for i in missing[start : start + 20_000]])
            self.columns.put(rows)
            self._add_to_index(rows)
        if self.is_trained_ivf or self.columns.count >= self.train_at:
            self._maybe_retrain()

    def save(self) -> None:
        """Write the snapshot atomically (temp file, fsync, rename, folder fsync)."""
        if not self._dirty and self.path.exists():
            return
        tmp = self.path.with_suffix(".faiss.tmp")
        faiss.write_index(self._index, str(tmp))
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, self.path)
        fsync_dir(self.path.parent)  # the rename itself survives a crash only once its folder is synced
        self._dirty = False

    # -- writes ------------------------------------------------------------------------------------

    def add(self, rows: Sequence[VectorRow]) -> None:
        """Index ``rows`` (their rowids must not be in the index already)."""
        if not rows:
            return
        self.columns.put(rows)
        self._add_to_index(rows)
        self._maybe_retrain()

    def remove(self, rowids: Sequence[int]) -> None:
        """Delete the vectors of ``rowids`` from the index (not just hide them)."""
        if not rowids:
            return
        self.columns.drop(rowids)
        self._index.remove_ids(np.asarray(rowids, dtype=np.int64))
        self._dirty = True

    def _add_to_index(self, rows: Sequence[VectorRow]) -> None:
        if not rows:
            return
        ids = np.asarray([r.rowid for r in rows], dtype=np.int64)
        self._index.add_with_ids(_matrix(rows, self.dim), ids)
        self._dirty = True

    # -- training ----------------------------------------------------------------------------------

    @property
    def is_trained_ivf(self) -> bool:
        return hasattr(self._index, "nlist")

    @property
    def nlist(self) -> int:
        return int(self._index.nlist) if self.is_trained_ivf else 0

    def _maybe_retrain(self) -> None:
        n = self.columns.count
        if n < self.train_at:
            return
        if self.is_trained_ivf and n < RETRAIN_FACTOR * self.nlist * self.nlist:
            return
        self.rebuild()

    def rebuild(self) -> None:
        """Retrain the centroids on the current vectors and re-add them all (IVF once large enough)."""
        n = self.columns.count
        vectors = np.empty((n, self.dim), dtype=np.float32)
        ids = np.empty(n, dtype=np.int64)
        filled = 0
        for batch in self._store.vector_rows():
            k = len(batch)
            vectors[filled : filled + k] = _matrix(batch, self.dim)
            ids[filled : filled + k] = [r.rowid for r in batch]
            filled += k
        vectors, ids = vectors[:filled], ids[:filled]
        if filled < self.train_at:
            index = self._empty_flat()
        else:
            nlist = max(64, math.isqrt(filled))
            quantizer = faiss.IndexFlatIP(self.dim)
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
            sample = min(filled, nlist * TRAIN_POINTS_PER_LIST)
            rng = np.random.default_rng(0)
            picks = rng.choice(filled, size=sample, replace=False) if sample < filled else np.arange(filled)
            index.train(np.ascontiguousarray(vectors[np.sort(picks)]))
            self._quantizer = quantizer  # the IVF index borrows it
        if filled:
            index.add_with_ids(vectors, ids)
        self._index = index
        self._dirty = True

    def _empty_flat(self) -> Any:
        return faiss.IndexIDMap2(faiss.IndexFlatIP(self.dim))

    def _ids_in_index(self) -> npt.NDArray[np.int64]:
        if not self.is_trained_ivf:
            return np.sort(faiss.vector_to_array(self._index.id_map).astype(np.int64))
        invlists = self._index.invlists
        parts = [np.zeros(0, dtype=np.int64)]
        for lst in range(self._index.nlist):
            size = invlists.list_size(lst)
            if size:
                parts.append(faiss.rev_swig_ptr(invlists.get_ids(lst), size).astype(np.int64))
        return np.sort(np.concatenate(parts))

    # -- search ------------------------------------------------------------------------------------

    def search(self, query: F32, access: AccessFilter, k: int, *, exact: bool = False) -> list[tuple[int, float]]:
        """The ``k`` allowed rowids nearest to ``query`` (normalised), best first, with cosine scores."""
        mask = self.columns.mask(access)
        allowed = int(mask.sum())
        if allowed == 0:
            return []
        bitmap = np.packbits(mask, bitorder="little")
        selector = faiss.IDSelectorBitmap(len(mask), faiss.swig_ptr(bitmap))
        if self.is_trained_ivf:
            params = faiss.SearchParametersIVF()
            if exact or allowed <= self.exact_below:
                params.nprobe = self.nlist
            else:
                # A sparser filter leaves fewer allowed vectors per list: probe more lists.
                share = allowed / max(self.columns.count, 1)
                params.nprobe = min(self.nlist, math.ceil(self.nprobe / math.sqrt(share)))
        else:
            params = faiss.SearchParameters()
        params.sel = selector
        # One query is too little work to share: OpenMP's barrier costs milliseconds on a busy machine.
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)
        try:
            scores, ids = self._index.search(query.reshape(1, self.dim), min(k, allowed), params=params)
        finally:
            faiss.omp_set_num_threads(threads)
        del bitmap  # the selector points into it until the search returns
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
