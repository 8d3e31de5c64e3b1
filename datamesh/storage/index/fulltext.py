"""Full-text engine: one SQLite file per region with a ``docs`` table and an FTS5 table over it.

``docs`` holds each turn's ids, access fields and its embedding (float32, L2-normalised; the vector
index is keyed by the same rowid and rebuilt from here).  Rowids are never reused (AUTOINCREMENT),
so a stale vector snapshot can never attach an old vector to a new document.  ``fts`` holds the segmented
prompt and response (see :mod:`.text_query`) under the same rowid.  A search joins the two and puts
the caller's access filter in the ``WHERE`` clause, so rows of other tenants or entities never reach
ranking, ``LIMIT`` or snippets.

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

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS docs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    turn_id TEXT NOT NULL UNIQUE,
    conversation_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    entity_id TEXT NOT NULL,
    created_us INTEGER NOT NULL,
    embedding BLOB
);
CREATE INDEX IF NOT EXISTS docs_conversation ON docs(conversation_id);
CREATE INDEX IF NOT EXISTS docs_entity ON docs(entity_id);
CREATE INDEX IF NOT EXISTS docs_access ON docs(tenant, entity_id, created_us);
CREATE VIRTUAL TABLE IF NOT EXISTS fts USING fts5(prompt, response, tokenize="{TOKENIZER}");
"""

SNIPPET_OPEN = "["
SNIPPET_CLOSE = "]"
SNIPPET_TOKENS = 16
PREVIEW_CHARS = 160


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

    def __init__(self, path: Path, *, synchronous: str = "FULL") -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={synchronous}")
        self._db.execute("PRAGMA secure_delete=ON")
        self._db.executescript(_SCHEMA)

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def upsert(self, docs: Sequence[IndexDocument], embeddings: Sequence[bytes | None]) -> tuple[list[int], list[int]]:
        """Insert or replace ``docs`` (keyed by turn id) in one transaction.

        Returns the new rowids (in order) and the rowids of replaced documents.
        """
        rowids: list[int] = []
        replaced: list[int] = []
        with self._tx() as db:
            for doc, blob in zip(docs, embeddings, strict=True):
                old = db.execute("SELECT id FROM docs WHERE turn_id = ?", (str(doc.turn_id),)).fetchone()
                if old is not None:
                    db.execute("DELETE FROM fts WHERE rowid = ?", (old[0],))
                    db.execute("DELETE FROM docs WHERE id = ?", (old[0],))
                    replaced.append(int(old[0]))
                cur = db.execute(
                    "INSERT INTO docs(turn_id, conversation_id, tenant, entity_id, created_us, embedding)"
                    " VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        str(doc.turn_id),
                        str(doc.conversation_id),
                        doc.tenant,
                        str(doc.entity_id),
                        to_micros(doc.created_at),
                        blob,
                    ),
                )
                rowid = int(cur.lastrowid or 0)
                db.execute(
                    "INSERT INTO fts(rowid, prompt, response) VALUES (?, ?, ?)",
                    (rowid, segment(doc.prompt), segment(doc.response)),
                )
                rowids.append(rowid)
        return rowids, replaced

    def delete_where(self, column: str, values: Sequence[str]) -> list[int]:
        """Delete every document whose ``column`` (conversation_id or entity_id) is in ``values``.

        Returns the rowids deleted.
        """
        if column not in ("conversation_id", "entity_id"):
            raise ValueError(column)
        with self._tx() as db:
            rows = db.execute(
                f"SELECT id FROM docs WHERE {column} IN (SELECT value FROM json_each(?))",
                (json.dumps(list(values)),),
            ).fetchall()
            ids = [(r[0],) for r in rows]
            db.executemany("DELETE FROM fts WHERE rowid = ?", ids)
            db.executemany("DELETE FROM docs WHERE id = ?", ids)
        return [int(r[0]) for r in rows]

    def search(self, match: str, access: AccessFilter, limit: int) -> list[TextHit]:
        """Best ``limit`` rows matching ``match`` among those ``access`` allows, by bm25."""
        where = ["fts MATCH ?", "d.tenant = ?"]
        params: list[object] = [SNIPPET_OPEN, SNIPPET_CLOSE, SNIPPET_TOKENS, match, access.tenant]
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
        params.append(limit)
        sql = (
            "SELECT d.id, d.conversation_id, d.turn_id, bm25(fts) AS s, snippet(fts, -1, ?, ?, '…', ?)"
            " FROM fts JOIN docs d ON d.id = fts.rowid"
            f" WHERE {' AND '.join(where)} ORDER BY s LIMIT ?"
        )
        with self._lock:
            rows = self._db.execute(sql, params).fetchall()
        # bm25() is lower-is-better; negate so every engine's score is higher-is-better.
        return [TextHit(r[0], r[1], r[2], -float(r[3]), desegment(r[4])) for r in rows]

    def previews(self, rowids: Sequence[int]) -> dict[int, tuple[str, str, str]]:
        """``rowid -> (conversation_id, turn_id, start of the response)`` for rows that still exist."""
        with self._lock:
            rows = self._db.execute(
                "SELECT d.id, d.conversation_id, d.turn_id, substr(f.response, 1, ?)"
                " FROM docs d JOIN fts f ON f.rowid = d.id"
                " WHERE d.id IN (SELECT value FROM json_each(?))",
                (PREVIEW_CHARS * 2, json.dumps(list(rowids))),
            ).fetchall()
        return {int(r[0]): (r[1], r[2], desegment(r[3])[:PREVIEW_CHARS]) for r in rows}

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
            self._db.execute("INSERT INTO fts(fts) VALUES ('optimize')")
            self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def close(self) -> None:
        with self._lock:
            self._db.close()
