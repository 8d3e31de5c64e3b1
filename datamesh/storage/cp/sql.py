"""Small helpers shared by the CP repositories: clocks, dialect-aware upserts and bulk inserts."""

from __future__ import annotations

import io
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """SQLite hands back naive datetimes (stored as UTC); PostgreSQL aware ones."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def insert_ignore(conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> None:
    """Multi-row insert that skips rows whose key already exists (idempotent writes)."""
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    conn.execute(dialect.insert(table).on_conflict_do_nothing(index_elements=list(keys)), list(rows))


def upsert(
    conn: Connection, table: Table, rows: Sequence[dict[str, Any]], keys: Sequence[str], update: Sequence[str]
) -> None:
    """Multi-row insert that overwrites ``update`` columns of rows whose key exists."""
    if not rows:
        return
    dialect = postgresql if conn.dialect.name == "postgresql" else sqlite
    stmt = dialect.insert(table)
    stmt = stmt.on_conflict_do_update(index_elements=list(keys), set_={c: stmt.excluded[c] for c in update})
    conn.execute(stmt, list(rows))


def bulk_insert(conn: Connection, table: Table, rows: Sequence[dict[str, Any]]) -> None:
    """Insert ``rows`` set-based: ``COPY`` on PostgreSQL, one executemany on SQLite.

    ``COPY`` runs in the caller's transaction (it is the same DBAPI connection) and checks every
    constraint as ``INSERT`` does, so a duplicate key still fails the transaction.
    """
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        conn.execute(table.insert(), list(rows))
        return
    columns = list(rows[0])
    formatted = [_copy_column([row[c] for row in rows]) for c in columns]
    buffer = io.StringIO("\n".join(map("\t".join, zip(*formatted, strict=True))) + "\n")
    quoted = ", ".join(f'"{c}"' for c in columns)
    statement = f'COPY "{table.name}" ({quoted}) FROM STDIN'
    dbapi_error: type[Exception] = conn.dialect.loaded_dbapi.Error
    cursor: Any = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.copy_expert(statement, buffer)
    except dbapi_error as exc:
        # a raw cursor bypasses SQLAlchemy: wrap as it would, so retries and translation see it
        raise DBAPIError.instance(statement, None, exc, dbapi_error) from exc
    finally:
        cursor.close()


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_str(value: str) -> str:
    if "\\" in value or "\t" in value or "\n" in value or "\r" in value:
        return value.translate(_COPY_ESCAPES)
    return value


_COPY_FORMAT: dict[type, Any] = {
    str: _copy_str,
    int: str,
    float: repr,
    bool: lambda v: "t" if v else "f",
    type(None): lambda _: "\\N",
    datetime: datetime.isoformat,
}


def _copy_column(values: list[Any]) -> list[str]:
    """One column of a COPY, formatted column-wise: a batch's columns are mostly one repeated value
    (the transaction's timestamp, the saga id, the tenant) or ids and hashes that need no escaping.
    """
    first = values[0]
    if all(v is first for v in values):
        return [_copy_value(first)] * len(values)
    kinds = set(map(type, values))
    if kinds == {str}:
        joined = "".join(values)
        if "\\" in joined or "\t" in joined or "\n" in joined or "\r" in joined:
            return [_copy_str(v) for v in values]
        return values
    if kinds == {int}:
        return list(map(str, values))
    return [_copy_value(v) for v in values]


def _copy_value(value: object) -> str:
    """One value in COPY's text format (ids and hashes, the bulk of it, need no escaping)."""
    format_ = _COPY_FORMAT.get(type(value))
    if format_ is None:
        return _copy_str(str(value))
    result: str = format_(value)
    return result
