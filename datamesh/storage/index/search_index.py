"""The index tier's facade: one :class:`SearchIndex` per region, under ``<root>/<region>/``.

One process opens a region's index for writing at a time (an exclusive ``flock`` on ``writer.lock``;
a second open fails with a retryable ``StorageError``): the vector index lives in that process's
memory.  Any number of other processes may open it ``readonly``: no lock, ``text.sqlite`` opened
read-only (WAL: they read beside the writer), the vector snapshot loaded and reconciled in memory
with the embeddings in ``text.sqlite``; before each search a read-only index checks SQLite's
``data_version`` and, when the writer has committed since, reconciles its vectors again.  Writes to
a read-only index fail with ``StorageError``.
Methods block; call them from asyncio through ``asyncio.to_thread``.

Files per region: ``text.sqlite`` (documents, access fields, embeddings, FTS5 index) and
``vectors.faiss`` (the vector index snapshot, rebuildable from ``text.sqlite``).  A region's index
accepts only that region's documents (``ValidationError`` otherwise), so content never crosses
regions; :class:`RegionalIndexes` routes a mixed batch to the right regions.

Every public method returns a ``Result``.  This module is the one boundary where ``sqlite3``,
faiss (``RuntimeError``) and file-system errors become ``StorageError(tier="index")``.

Searches apply the caller's access (tenant, allowed entities, one entity, time range) inside each
engine's query; a hybrid search (text and vector) fuses the two filtered rankings by reciprocal
rank fusion.  Scores are higher-is-better: negated bm25 for text, cosine for vectors, RRF for both.
"""

from __future__ import annotations

import fcntl
import math
import os
import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence, Set
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

import numpy as np

from datamesh.core.errors import StorageError, ValidationError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import ConversationId, EntityId, GeoRegion, TurnId
from datamesh.storage.index.document import (
    AccessFilter,
    IndexDocument,
    IndexQuery,
    SearchHit,
    check_document,
    check_filter,
    to_micros,
)
from datamesh.storage.index.fulltext import FullTextStore, TextHit, VectorRow
from datamesh.storage.index.text_query import build_match
from datamesh.storage.index.vectors import DEFAULT_EXACT_BELOW, DEFAULT_NPROBE, DEFAULT_TRAIN_AT, VectorIndex

T = TypeVar("T")

DEFAULT_DIM = 384  # all-MiniLM-L6-v2
DEFAULT_SNAPSHOT_EVERY = 100_000
RRF_K = 60
LOCK_FILE = "writer.lock"
TEXT_FILE = "text.sqlite"
VECTOR_FILE = "vectors.faiss"


@dataclass(frozen=True, slots=True, kw_only=True)
class IndexConfig:
    """Settings of every regional index.

    ``dim``: embedding dimensions.  ``synchronous``: SQLite durability (FULL: durable per batch).
    ``train_at``/``nprobe``/``exact_below``: see :mod:`.vectors`.  ``snapshot_every``: vectors added
    between automatic snapshots (removals always snapshot at once, so erased vectors leave the disk).
    """

    dim: int = DEFAULT_DIM
    synchronous: str = "FULL"
    train_at: int = DEFAULT_TRAIN_AT
    nprobe: int = DEFAULT_NPROBE
    exact_below: int = DEFAULT_EXACT_BELOW
    snapshot_every: int = DEFAULT_SNAPSHOT_EVERY


def _guard(operation: str, fn: Callable[[], T]) -> Result[T, StorageError]:
    """Run ``fn``, translating engine failures into ``StorageError`` (the cause kept)."""
    try:
        return Ok(fn())
    except sqlite3.Error as exc:
        text = str(exc)
        retryable = isinstance(exc, sqlite3.OperationalError) and ("locked" in text or "busy" in text)
        return Err(StorageError("index", operation, text, retryable=retryable, cause=repr(exc)))
    except (OSError, RuntimeError, MemoryError) as exc:
        busy = isinstance(exc, BlockingIOError)
        return Err(StorageError("index", operation, str(exc) or type(exc).__name__, retryable=busy, cause=repr(exc)))


def _take_writer_lock(path: Path) -> int:
    """One process per regional index: its in-memory vector index is the writer's alone."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise BlockingIOError(f"index {path.parent} is open in another process or object") from None
    return fd


def _initialised(path: Path) -> bool:
    """Whether the writer has created the schema of ``path`` (it creates the file a moment before)."""
    try:
        db = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'tenants'").fetchone()
            return bool(row[0])
        finally:
            db.close()
    except sqlite3.Error:
        return False


def _widen(result: Result[T, StorageError]) -> Result[T, ValidationError | StorageError]:
    return result if isinstance(result, Ok) else Err(result.error)


def _normalise(vector: Sequence[float]) -> np.ndarray:
    arr = np.asarray(vector, dtype=np.float32)
    return arr / np.float32(np.linalg.norm(arr))


class SearchIndex:
    """Full-text and vector search over one region's turns.  Thread-safe; one writer process."""

    def __init__(self, directory: Path, region: GeoRegion, config: IndexConfig, *, readonly: bool = False) -> None:
        """Use :meth:`open`."""
        self.directory = directory
        self.region = region
        self.config = config
        self.readonly = readonly
        self._lock = threading.RLock()
        self._unsaved = 0
        if readonly:
            self._lock_fd = -1
            self._store = FullTextStore(directory / TEXT_FILE, readonly=True)
            try:
                self._open_vectors()
            except BaseException:
                self._store.close()
                raise
            return
        directory.mkdir(parents=True, exist_ok=True)
        self._lock_fd = _take_writer_lock(directory / LOCK_FILE)
        try:
            self._store = FullTextStore(directory / TEXT_FILE, synchronous=config.synchronous)
            self._open_vectors()
        except BaseException:
            os.close(self._lock_fd)
            raise

    def _open_vectors(self) -> None:
        config = self.config
        self._vectors = VectorIndex(
            self.directory / VECTOR_FILE,
            config.dim,
            self._store,
            train_at=config.train_at,
            nprobe=config.nprobe,
            exact_below=config.exact_below,
        )
        self._vectors.open()

    @classmethod
    def open(
        cls, root: Path, region: GeoRegion, *, config: IndexConfig | None = None, readonly: bool = False
    ) -> Result[SearchIndex, StorageError]:
        """Open (or create) the index of ``region`` under ``root/<region>/``.

        ``readonly``: open an existing index for searching beside its writer (``Err`` if none yet).
        """
        directory = Path(root) / region.value
        return _guard("open", lambda: cls(directory, region, config or IndexConfig(), readonly=readonly))

    def _refuse(self, operation: str) -> Err[StorageError] | None:
        if not self.readonly:
            return None
        return Err(StorageError("index", operation, f"index {self.directory} is open read-only"))

    def _refresh(self) -> None:
        """Read-only: follow the writer's commits (vectors reconciled in memory, never saved)."""
        if self.readonly:
            with self._lock:  # one thread reconciles; the others wait for it rather than search stale vectors
                if self._store.changed():
                    self._vectors.reconcile()

    # -- writes ------------------------------------------------------------------------------------

    def add_many(self, docs: Sequence[IndexDocument]) -> Result[int, ValidationError | StorageError]:
        """Index ``docs`` (insert, or replace by turn id: redelivery is harmless); all or nothing.

        ``Err(ValidationError)`` if any document belongs to another region, has a naive timestamp or
        a malformed embedding; nothing is written then.  Returns how many documents were indexed.
        """
        if (refused := self._refuse("add")) is not None:
            return refused
        for doc in docs:
            checked = check_document(doc, self.region, self.config.dim)
            if isinstance(checked, Err):
                return Err(checked.error)
        blobs = [None if d.embedding is None else _normalise(d.embedding).tobytes() for d in docs]
        return _widen(_guard("add", lambda: self._add(docs, blobs)))

    def _add(self, docs: Sequence[IndexDocument], blobs: Sequence[bytes | None]) -> int:
        with self._lock:
            rowids, replaced = self._store.upsert(docs, blobs)
            gone = set(replaced)
            self._vectors.remove(replaced)
            rows = [
                VectorRow(rowid, doc.tenant, str(doc.entity_id), to_micros(doc.created_at), blob)
                for rowid, doc, blob in zip(rowids, docs, blobs, strict=True)
                if blob is not None and rowid not in gone
            ]
            if rows:
                self._vectors.add(rows)
                self._unsaved += len(rows)
            if self._unsaved >= self.config.snapshot_every:
                self._vectors.save()
                self._unsaved = 0
        return len(docs)

    def remove_conversations(self, ids: Iterable[ConversationId]) -> Result[int, StorageError]:
        """Remove every turn of these conversations from both indexes; returns turns removed."""
        if (refused := self._refuse("remove_conversations")) is not None:
            return refused
        keys = [str(i) for i in ids]
        return _guard("remove_conversations", lambda: self._remove("conversation_id", keys))

    def remove_entity(self, entity_id: EntityId) -> Result[int, StorageError]:
        """Remove every turn of ``entity_id`` from both indexes (erasure); returns turns removed."""
        if (refused := self._refuse("remove_entity")) is not None:
            return refused
        return _guard("remove_entity", lambda: self._remove("entity_id", [str(entity_id)]))

    def _remove(self, column: str, keys: Sequence[str]) -> int:
        with self._lock:
            rowids = self._store.delete_where(column, keys)
            if rowids:
                self._vectors.remove(rowids)
                self._vectors.save()
            return len(rowids)

    # -- reads -------------------------------------------------------------------------------------

    def search(
        self,
        text: str | None = None,
        vector: Sequence[float] | None = None,
        *,
        tenant: str,
        allowed_entities: Set[EntityId] | None = None,
        entity_id: EntityId | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 10,
    ) -> Result[list[SearchHit], ValidationError | StorageError]:
        """The best ``limit`` turns the caller may see, by text, by vector, or both (fused by RRF).

        ``allowed_entities=None``: every entity of ``tenant``; an empty set: nothing.  ``since`` is
        inclusive, ``until`` exclusive.  ``Err(ValidationError)`` for a missing query, a query
        without searchable characters, a vector of the wrong size or a bad limit.
        """
        access = AccessFilter(tenant, allowed_entities, entity_id, since, until)
        checked = check_filter(access, limit)
        if isinstance(checked, Err):
            return Err(checked.error)
        if text is None and vector is None:
            return Err(ValidationError("text", "give text, vector or both"))
        match: str | None = None
        if text is not None:
            built = build_match(text)
            if isinstance(built, Err):
                return Err(built.error)
            match = built.value
        query: np.ndarray | None = None
        if vector is not None:
            if len(vector) != self.config.dim:
                return Err(ValidationError("vector", f"expected {self.config.dim} dimensions, got {len(vector)}"))
            norm = math.sqrt(math.fsum(x * x for x in vector))
            if not math.isfinite(norm) or norm == 0.0:
                return Err(ValidationError("vector", "zero or non-finite vector"))
            query = _normalise(vector)
        return _widen(_guard("search", lambda: self._search(match, query, access, limit)))

    def run(self, query: IndexQuery) -> Result[list[SearchHit], ValidationError | StorageError]:
        """:meth:`search` with its arguments in one record (as they travel to a search worker)."""
        access = query.access
        return self.search(
            query.text,
            query.vector,
            tenant=access.tenant,
            allowed_entities=access.allowed_entities,
            entity_id=access.entity_id,
            since=access.since,
            until=access.until,
            limit=query.limit,
        )

    def _search(self, match: str | None, query: np.ndarray | None, access: AccessFilter, limit: int) -> list[SearchHit]:
        depth = limit if match is None or query is None else max(3 * limit, 30)
        self._refresh()
        with self._lock:
            text_hits = [] if match is None else self._store.search(match, access, depth)
            vector_hits = [] if query is None else self._vectors.search(query, access, depth)
            previews = self._store.previews([rowid for rowid, _ in vector_hits]) if vector_hits else {}
        if query is None:
            return [_hit(h.conversation_id, h.turn_id, h.score, h.snippet) for h in text_hits]
        if match is None:
            return [
                _hit(previews[rowid][0], previews[rowid][1], score, previews[rowid][2])
                for rowid, score in vector_hits
                if rowid in previews
            ]
        return _fuse(text_hits, vector_hits, previews, limit)

    def count(self) -> Result[int, StorageError]:
        """How many turns this region's index holds."""
        return _guard("count", self._store.count)

    # -- maintenance -------------------------------------------------------------------------------

    def flush(self) -> Result[None, StorageError]:
        """Write the vector snapshot now (text is durable on every ``add_many``)."""
        if (refused := self._refuse("flush")) is not None:
            return refused
        return _guard("flush", self._flush)

    def _flush(self) -> None:
        with self._lock:
            self._vectors.save()
            self._unsaved = 0

    def compact(self) -> Result[None, StorageError]:
        """Merge FTS5 segments (purging postings of removed turns) and retrain the vector index."""
        if (refused := self._refuse("compact")) is not None:
            return refused
        return _guard("compact", self._compact)

    def _compact(self) -> None:
        with self._lock:
            self._store.optimize()
            self._vectors.rebuild()
            self._vectors.save()
            self._unsaved = 0

    def close(self) -> Result[None, StorageError]:
        """Snapshot the vectors and close the SQLite file."""
        return _guard("close", self._close)

    def _close(self) -> None:
        with self._lock:
            if self.readonly:
                self._store.close()
                return
            try:
                self._vectors.save()
                self._store.close()
            finally:
                os.close(self._lock_fd)


def _hit(conversation_id: str, turn_id: str, score: float, snippet: str) -> SearchHit:
    return SearchHit(ConversationId.parse(conversation_id).unwrap(), TurnId.parse(turn_id).unwrap(), score, snippet)


def _fuse(
    text_hits: list[TextHit],
    vector_hits: list[tuple[int, float]],
    previews: dict[int, tuple[str, str, str]],
    limit: int,
) -> list[SearchHit]:
    """Reciprocal rank fusion of two already access-filtered rankings."""
    scores: dict[int, float] = {}
    info: dict[int, tuple[str, str, str]] = {}
    for rank, h in enumerate(text_hits):
        scores[h.rowid] = scores.get(h.rowid, 0.0) + 1.0 / (RRF_K + rank + 1)
        info[h.rowid] = (h.conversation_id, h.turn_id, h.snippet)
    for rank, (rowid, _) in enumerate(vector_hits):
        if rowid not in previews:
            continue
        scores[rowid] = scores.get(rowid, 0.0) + 1.0 / (RRF_K + rank + 1)
        info.setdefault(rowid, previews[rowid])
    best = sorted(scores, key=lambda r: scores[r], reverse=True)[:limit]
    return [_hit(info[r][0], info[r][1], scores[r], info[r][2]) for r in best]


class RegionalIndexes:
    """Every region's :class:`SearchIndex` under one root, opened on first use (``readonly``: for searching)."""

    def __init__(self, root: Path, *, config: IndexConfig | None = None, readonly: bool = False) -> None:
        self.root = Path(root)
        self.config = config or IndexConfig()
        self.readonly = readonly
        self._open: dict[GeoRegion, SearchIndex] = {}
        self._lock = threading.Lock()

    def region(self, region: GeoRegion) -> Result[SearchIndex, StorageError]:
        """The index of ``region`` (opened once, then shared)."""
        with self._lock:
            if region in self._open:
                return Ok(self._open[region])
            opened = SearchIndex.open(self.root, region, config=self.config, readonly=self.readonly)
            if isinstance(opened, Ok):
                self._open[region] = opened.value
            return opened

    def exists(self, region: GeoRegion) -> bool:
        """Whether ``region`` has an index (its ``text.sqlite`` exists, and read-only: is initialised)."""
        with self._lock:
            if region in self._open:
                return True
        path = self.root / region.value / TEXT_FILE
        if not path.exists():
            return False
        return not self.readonly or _initialised(path)

    def search_regions(
        self, regions: Sequence[GeoRegion], query: IndexQuery
    ) -> Result[list[list[SearchHit]], ValidationError | StorageError]:
        """Each region's hits, in the order of ``regions``; a region without an index has none
        (nothing was ever indexed there, and a read-only index cannot create it)."""
        out: list[list[SearchHit]] = []
        for region in regions:
            if not self.exists(region):
                out.append([])
                continue
            index = self.region(region)
            if isinstance(index, Err):
                return Err(index.error)
            found = index.value.run(query)
            if isinstance(found, Err):
                return found
            out.append(found.value)
        return Ok(out)

    def count_regions(self, regions: Sequence[GeoRegion]) -> Result[list[int | None], StorageError]:
        """How many turns each region's index holds (``None``: that region has no index)."""
        out: list[int | None] = []
        for region in regions:
            if not self.exists(region):
                out.append(None)
                continue
            index = self.region(region)
            if isinstance(index, Err):
                return index
            counted = index.value.count()
            if isinstance(counted, Err):
                return counted
            out.append(counted.value)
        return Ok(out)

    def add_many(self, docs: Sequence[IndexDocument]) -> Result[int, ValidationError | StorageError]:
        """Route each document to its own region's index; returns how many were indexed."""
        by_region: dict[GeoRegion, list[IndexDocument]] = {}
        for doc in docs:
            by_region.setdefault(doc.region, []).append(doc)
        total = 0
        for region, group in by_region.items():
            index = self.region(region)
            if isinstance(index, Err):
                return Err(index.error)
            added = index.value.add_many(group)
            if isinstance(added, Err):
                return added
            total += added.value
        return Ok(total)

    def close(self) -> Result[None, StorageError]:
        """Close every open regional index; the first failure is returned after trying them all."""
        first: Result[None, StorageError] = Ok(None)
        with self._lock:
            for index in self._open.values():
                closed = index.close()
                if isinstance(closed, Err) and isinstance(first, Ok):
                    first = closed
            self._open.clear()
        return first
