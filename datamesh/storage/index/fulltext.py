"""Full-text engine: one SQLite file per region: a ``docs`` table and one FTS5 table per tenant.

``docs`` holds each turn's ids, access fields, a short preview and its embedding (float32,
L2-normalised; the vector index is keyed by the same rowid and rebuilt from here).  Rowids are never
reused (AUTOINCREMENT), so a stale vector snapshot can never attach an old vector to a new document.

``fts_<n>`` (``n`` from the ``tenants`` table) holds the segmented prompt and response (see
:mod:`.text_query`) of one tenant's turns under the same rowid.  One table per tenant because bm25
scores depend on corpus statistics (document counts, term frequencies, average length): in a shared
table another tenant's writes would shift this tenant's scores and even its ranks, a side channel on
their content.  Per-tenant tables make scores, ranks and counts functions of the tenant's own data;
a search also reads only that tenant's postings.  The remaining filter (entities, time range) is in
the ``WHERE`` clause, so disallowed rows never reach ranking, ``LIMIT`` or snippets.  (Thousands of
tenants per region are fine; far more would call for grouping tenants into shards.)

``secure_delete`` is on: pages freed by a removal are zeroed, so erased text does not linger in the
file.  FTS5 keeps deleted rowids in older index segments until they merge; :meth:`optimize` merges
them all (see ``SearchIndex.compact``).

Raises ``sqlite3.Error``; the facade translates it.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from datamesh.storage.index.document import AccessFilter, IndexDocument, to_micros
from datamesh.storage.index.text_query import TOKENIZER, desegment, segment

_SCHEMA = """
CREATE TABLE IF NOT EXISTS docs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    turn_id TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    preview TEXT NOT NULL,
    embedding BLOB
);
CREATE TABLE IF NOT EXISTS tenants (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE);
CREATE INDEX IF NOT EXISTS docs_conversation ON docs(conversation_id);
CREATE INDEX IF NOT EXISTS docs_entity ON docs(entity_id);
"""
_FTS = f'CREATE VIRTUAL TABLE IF NOT EXISTS fts_{{n}} USING fts5(prompt, response, tokenize="{TOKENIZER}")'
#: FTS5's in-memory buffer of terms written in a transaction, flushed to a new segment when full
#: (SQLite's default: 1 MiB).  A bigger buffer makes fewer, larger segments, so a big batch costs
#: far less merging; it is a persistent setting of each table, and memory only while writing.
FTS_HASH_BYTES = 16 * 1024 * 1024

SNIPPET_OPEN = "["
SNIPPET_CLOSE = "]"
SNIPPET_TOKENS = 16
PREVIEW_CHARS = 160
_LOOKUP_CHUNK = 500  # turn ids per IN (...) lookup, under SQLite's variable limit
_INSERT_DOC = (
    "INSERT INTO docs(id, turn_id, conversation_id, tenant, entity_id, created_us, preview, embedding)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class TextHit:
    rowid: int
    conversation_id: str
    turn_id: str
    score: float
    snippet: str


@dataclass(frozen=True, slots=True)
class VectorRow:
    """A document with an embedding: its rowid (the vector id), access fields and vector bytes."""

    rowid: int
    tenant: str
    entity_id: str
    created_us: int
    embedding: bytes


class FullTextStore:
    """The per-region SQLite file: documents, their access fields, embeddings and the FTS5 index."""

    def __init__(self, path: Path, *, synchronous: str = "FULL", readonly: bool = False) -> None:
        """Open (or create) the file; ``readonly`` opens an existing file for reading only.

        A read-only store reads beside the writer (WAL: readers see the last commit and never
        block it); :meth:`changed` tells when the writer has committed since the last look.
        """
        self._lock = threading.RLock()
        self.readonly = readonly
        if readonly:
            if not path.exists():
                raise FileNotFoundError(f"no index file {path}")
            self._db = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            self._db.execute("PRAGMA secure_delete=ON")
            self._db.executescript(_SCHEMA)
        self._data_version = self._version()
        self._tenants: dict[str, int] = self._load_tenants()
        if not readonly:
            self._configure_tables()

    def _version(self) -> int:
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _load_tenants(self) -> dict[str, int]:
        return {name: int(n) for n, name in self._db.execute("SELECT id, name FROM tenants")}

    def _configure_tables(self) -> None:
        """Give tables made before :data:`FTS_HASH_BYTES` was set (or changed) that setting."""
        stale = [
            n
            for n in self._tenants.values()
            if self._db.execute(f"SELECT v FROM fts_{n}_config WHERE k = 'hashsize'").fetchone() != (FTS_HASH_BYTES,)
        ]
        if stale:
            with self._tx() as db:
                for n in stale:
                    db.execute(f"INSERT INTO fts_{n}(fts_{n}, rank) VALUES ('hashsize', ?)", (FTS_HASH_BYTES,))

    def changed(self) -> bool:
        """Whether another connection committed since the last call (then the tenants are re-read)."""
        with self._lock:
            version = self._version()
            if version == self._data_version:
                return False
            self._data_version = version
            self._tenants = self._load_tenants()
            return True

    def _table(self, db: sqlite3.Connection, tenant: str) -> str:
        """The FTS5 table of ``tenant``, created inside the current transaction if new."""
        n = self._tenants.get(tenant)
        if n is None:
            n = int(db.execute("INSERT INTO tenants(name) VALUES (?)", (tenant,)).lastrowid or 0)
            db.execute(_FTS.format(n=n))
            db.execute(f"INSERT INTO fts_{n}(fts_{n}, rank) VALUES ('hashsize', ?)", (FTS_HASH_BYTES,))
            self._tenants[tenant] = n
        return f"fts_{n}"

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                # A tenant table made in this transaction is gone with it: forget its number, or the
                # next new tenant (given the same number) would share that tenant's table.
                self._tenants = self._load_tenants()
                raise

    def upsert(self, docs: Sequence[IndexDocument], embeddings: Sequence[bytes | None]) -> tuple[list[int], list[int]]:
        """Insert or replace ``docs`` (keyed by turn id) in one transaction.

        Returns the new rowids (in order) and the rowids of replaced documents.  Rowids are the ones
        AUTOINCREMENT would give one insert at a time (``sqlite_sequence`` + 1, + 2, ...: this
        transaction is the only writer), so the rows go in with one ``executemany`` per table.  A
        document given twice in one call keeps its last copy; the earlier copy's rowid is reported
        as replaced and never written.
        """
        if len(embeddings) != len(docs):
            raise ValueError(f"{len(docs)} documents but {len(embeddings)} embeddings")
        turn_ids = [str(doc.turn_id) for doc in docs]  # each id made text once
        with self._tx() as db:
            present = self._present(db, turn_ids)
            tables = {tenant: self._table(db, tenant) for tenant in dict.fromkeys(doc.tenant for doc in docs)}
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'docs'").fetchone()
            first = (0 if seq is None else int(seq[0])) + 1
            rowids = list(range(first, first + len(docs)))
            replaced: list[int] = []
            stale: list[tuple[int, str]] = []  # documents indexed before this call, to delete first
            superseded: set[int] = set()  # positions of earlier copies of a turn given twice in this call
            for i, (turn_id, doc) in enumerate(zip(turn_ids, docs, strict=True)):
                old = present.get(turn_id)
                if old is not None:
                    replaced.append(old[0])
                    if old[0] >= first:
                        superseded.add(old[0] - first)
                    else:
                        stale.append(old)
                present[turn_id] = (first + i, doc.tenant)
            for rowid, tenant in stale:
                db.execute(f"DELETE FROM {self._table(db, tenant)} WHERE rowid = ?", (rowid,))
            if stale:
                db.executemany("DELETE FROM docs WHERE id = ?", [(rowid,) for rowid, _ in stale])
            kept = [i for i in range(len(docs)) if i not in superseded] if superseded else range(len(docs))
            db.executemany(
                _INSERT_DOC,
                [
                    (
                        first + i,
                        turn_ids[i],
                        str(docs[i].conversation_id),
                        docs[i].tenant,
                        str(docs[i].entity_id),
                        to_micros(docs[i].created_at),
                        " ".join(docs[i].response[: PREVIEW_CHARS * 2].split())[:PREVIEW_CHARS],
                        embeddings[i],
                    )
                    for i in kept
                ],
            )
            by_tenant: dict[str, list[tuple[int, str, str]]] = {}
            for i in kept:  # rowids ascending per table: FTS5 appends to its pending segment
                doc = docs[i]
                by_tenant.setdefault(doc.tenant, []).append((first + i, segment(doc.prompt), segment(doc.response)))
            for tenant, rows in by_tenant.items():
                db.executemany(f"INSERT INTO {tables[tenant]}(rowid, prompt, response) VALUES (?, ?, ?)", rows)
        return rowids, replaced

    @staticmethod
    def _present(db: sqlite3.Connection, turn_ids: Sequence[str]) -> dict[str, tuple[int, str]]:
        """``turn_id → (rowid, tenant)`` of the documents already indexed among ``turn_ids`` (chunked lookups)."""
        found: dict[str, tuple[int, str]] = {}
        unique = list(dict.fromkeys(turn_ids))
        for start in range(0, len(unique), _LOOKUP_CHUNK):
            chunk = unique[start : start + _LOOKUP_CHUNK]
            marks = ",".join("?" * len(chunk))
            for turn_id, rowid, tenant in db.execute(
                f"SELECT turn_id, id, tenant FROM docs WHERE turn_id IN ({marks})", chunk
            ):
                found[turn_id] = (int(rowid), tenant)
        return found

    def delete_where(self, column: str, values: Sequence[str]) -> list[int]:
        """Delete every document whose ``column`` (conversation_id or entity_id) is in ``values``.

        Returns the rowids deleted.
        """
        if column not in ("conversation_id", "entity_id"):
            raise ValueError(column)
        with self._tx() as db:
            rows = db.execute(
                f"SELECT id, tenant FROM docs WHERE {column} IN (SELECT value FROM json_each(?))",
                (json.dumps(list(values)),),
            ).fetchall()
            for rowid, tenant in rows:
                db.execute(f"DELETE FROM {self._table(db, tenant)} WHERE rowid = ?", (rowid,))
            db.executemany("DELETE FROM docs WHERE id = ?", [(r[0],) for r in rows])
        return [int(r[0]) for r in rows]

    def search(self, match: str, access: AccessFilter, limit: int) -> list[TextHit]:
        """Best ``limit`` rows matching ``match`` among those ``access`` allows, by bm25.

        Two steps: rank (joining ``docs`` only when an entity or time filter needs it), then make
        snippets for the ``limit`` winners only; snippets are the costly part of a common word's query.
        """
        n = self._tenants.get(access.tenant)
        if n is None:
            return []
        table = f"fts_{n}"
        where = [f"{table} MATCH ?"]
        params: list[object] = [match]
        entities = access.entity_strings()
        if entities is not None:
            if not entities:
                return []
            where.append("d.entity_id IN (SELECT value FROM json_each(?))")
            params.append(json.dumps(entities))
        if access.since is not None:
            where.append("d.created_us >= ?")
            params.append(access.since_us())
        if access.until is not None:
            where.append("d.created_us < ?")
            params.append(access.until_us())
        join = f" JOIN docs d ON d.id = {table}.rowid" if len(where) > 1 else ""
        rank_sql = (
            f"SELECT {table}.rowid, bm25({table}) AS s FROM {table}{join}"
            f" WHERE {' AND '.join(where)} ORDER BY s LIMIT ?"
        )
        snippet_sql = (
            f"SELECT d.id, d.conversation_id, d.turn_id, snippet({table}, -1, ?, ?, '…', ?)"
            f" FROM {table} JOIN docs d ON d.id = {table}.rowid"
            f" WHERE {table} MATCH ? AND {table}.rowid IN (SELECT value FROM json_each(?))"
        )
        with self._lock:
            ranked = self._db.execute(rank_sql, [*params, limit]).fetchall()
            if not ranked:
                return []
            ids = json.dumps([r[0] for r in ranked])
            rows = self._db.execute(snippet_sql, (SNIPPET_OPEN, SNIPPET_CLOSE, SNIPPET_TOKENS, match, ids))
            info = {int(r[0]): (r[1], r[2], desegment(r[3])) for r in rows}
        # bm25() is lower-is-better; negate so every engine's score is higher-is-better.
        return [TextHit(int(r[0]), *info[int(r[0])][:2], -float(r[1]), info[int(r[0])][2]) for r in ranked]

    def previews(self, rowids: Sequence[int]) -> dict[int, tuple[str, str, str]]:
        """``rowid -> (conversation_id, turn_id, start of the response)`` for rows that still exist."""
        with self._lock:
            rows = self._db.execute(
                "SELECT id, conversation_id, turn_id, preview FROM docs WHERE id IN (SELECT value FROM json_each(?))",
                (json.dumps(list(rowids)),),
            ).fetchall()
        return {int(r[0]): (r[1], r[2], r[3]) for r in rows}

    def vector_ids(self) -> list[int]:
        """Rowids of every document that has an embedding."""
        with self._lock:
            return [int(r[0]) for r in self._db.execute("SELECT id FROM docs WHERE embedding IS NOT NULL")]

    def vector_rows(self, *, with_vectors: bool = True, batch: int = 20_000) -> Iterator[list[VectorRow]]:
        """Every document with an embedding, in rowid order, in batches (``embedding`` empty unless asked)."""
        after = -1
        column = "embedding" if with_vectors else "x''"
        while True:
            with self._lock:
                rows = self._db.execute(
                    f"SELECT id, tenant, entity_id, created_us, {column} FROM docs"
                    " WHERE id > ? AND embedding IS NOT NULL ORDER BY id LIMIT ?",
                    (after, batch),
                ).fetchall()
            if not rows:
                return
            yield [VectorRow(int(r[0]), r[1], r[2], int(r[3]), bytes(r[4])) for r in rows]
            after = int(rows[-1][0])

    def vector_rows_by_id(self, rowids: Sequence[int]) -> list[VectorRow]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, tenant, entity_id, created_us, embedding FROM docs"
                " WHERE id IN (SELECT value FROM json_each(?)) AND embedding IS NOT NULL ORDER BY id",
                (json.dumps(list(rowids)),),
            ).fetchall()
        return [VectorRow(int(r[0]), r[1], r[2], int(r[3]), bytes(r[4])) for r in rows]

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM docs").fetchone()[0])

    def optimize(self) -> None:
        """Merge FTS5 segments, dropping the postings of deleted rows, then checkpoint the WAL."""
        with self._lock:
            for n in self._tenants.values():
                self._db.execute(f"INSERT INTO fts_{n}(fts_{n}) VALUES ('optimize')")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._db.close()
