"""The CP tier's database: one engine, one transaction entry point, one error boundary.

Every CP transaction goes through :meth:`CpDatabase.run`, which

* on PostgreSQL runs at ``SERIALIZABLE`` and re-runs the whole transaction on serialization
  failures and deadlocks (SQLSTATE 40001 / 40P01) with full-jitter backoff and a bound;
* on SQLite (local mode) opens write transactions with ``BEGIN IMMEDIATE`` on a WAL database with
  ``synchronous=FULL``, which serialises writers, and retries ``database is locked``;
* translates every SQLAlchemy / DBAPI failure into ``StorageError`` (keeping the cause);
* counts, times and traces each transaction (``tier="cp"``, see ``datamesh.observability``).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import IntegrityError as SAIntegrityError

from datamesh.core.errors import ConfigError, StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.retry import RetryPolicy, call_with_retry
from datamesh.observability.instrument import tier_call

T = TypeVar("T")

DEFAULT_TX_POLICY = RetryPolicy(attempts=12, base_s=0.005, cap_s=0.5)
_RETRY_SQLSTATES = {"40001", "40P01"}
_UNIQUE_VIOLATION = "23505"


class _Retry(Exception):
    """Internal: the transaction hit a transient conflict and is re-run."""


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg2 (the ``postgresql`` extra), whatever SQLAlchemy defaults to."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


class CpDatabase:
    """An engine plus the transaction entry point; create with :meth:`open`."""

    def __init__(self, engine: Engine, *, policy: RetryPolicy = DEFAULT_TX_POLICY) -> None:
        self.engine = engine
        self.policy = policy
        self.dialect = engine.dialect.name

    @classmethod
    def open(
        cls, url: str, *, variable: str = "DATAMESH_CP_URL", **engine_kwargs: Any
    ) -> Result[CpDatabase, ConfigError]:
        """Build the engine for ``url`` (SQLite file or PostgreSQL); nothing connects yet."""
        url = normalize_url(url)
        try:
            parsed = make_url(url)
        except SQLAlchemyError as exc:
            return Err(ConfigError(variable, f"not a database URL: {exc}"))
        if parsed.get_backend_name() == "sqlite":
            if parsed.database and parsed.database != ":memory:":
                Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
            engine = create_engine(parsed, connect_args={"check_same_thread": False, "timeout": 30}, **engine_kwargs)
            _install_sqlite_hooks(engine)
        elif parsed.get_backend_name() == "postgresql":
            try:
                engine = create_engine(parsed, isolation_level="SERIALIZABLE", pool_pre_ping=True, **engine_kwargs)
            except (SQLAlchemyError, ImportError) as exc:
                return Err(ConfigError(variable, f"cannot use {parsed.drivername}: {exc}"))
        else:
            return Err(ConfigError(variable, f"unsupported database {parsed.get_backend_name()!r}"))
        return Ok(cls(engine))

    def run(
        self,
        fn: Callable[[Connection], T],
        *,
        operation: str,
        write: bool = True,
        retry_unique_violation: bool = False,
    ) -> Result[T, StorageError]:
        """Run ``fn`` in one transaction, re-running it whole on transient conflicts.

        ``fn`` must be safe to re-run (it only talks to this database).  With
        ``retry_unique_violation`` a unique-key race (two writers inserting the same key) is
        re-run too, so the loser sees the winner's row.
        """

        def attempt() -> T:
            try:
                with self.engine.connect() as conn:
                    if self.dialect == "sqlite":
                        conn = conn.execution_options(sqlite_begin="BEGIN IMMEDIATE" if write else "BEGIN")
                    with conn.begin():
                        return fn(conn)
            except DBAPIError as exc:
                if _is_transient(exc, retry_unique_violation):
                    raise _Retry(str(exc.orig)) from exc
                raise

        with tier_call("cp", operation) as call:
            try:
                return Ok(call_with_retry(attempt, lambda e: isinstance(e, _Retry), self.policy))
            except _Retry as exc:
                return call.check(
                    Err(StorageError("cp", operation, f"gave up after retries: {exc}", retryable=True, cause=repr(exc)))
                )
            except SQLAlchemyError as exc:
                return call.check(Err(translate(exc, operation)))

    def ping(self) -> Result[None, StorageError]:
        def select_one(conn: Connection) -> None:
            conn.execute(text("SELECT 1"))

        return self.run(select_one, operation="ping", write=False)

    def dispose(self) -> None:
        """Close pooled connections (also needed after fork: the child must not share sockets)."""
        self.engine.dispose()


def translate(exc: SQLAlchemyError, operation: str) -> StorageError:
    """The CP tier's one translation boundary for SQLAlchemy / DBAPI failures."""
    orig = getattr(exc, "orig", None)
    retryable = isinstance(exc, DBAPIError) and bool(exc.connection_invalidated)
    if isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig):
        retryable = True
    kind = "constraint violated" if isinstance(exc, SAIntegrityError) else type(orig or exc).__name__
    message = str(orig if orig is not None else exc).strip().splitlines()[0]
    return StorageError("cp", operation, f"{kind}: {message}", retryable=retryable, cause=repr(exc))


def _is_transient(exc: DBAPIError, unique_too: bool) -> bool:
    orig = exc.orig
    code = getattr(orig, "pgcode", None)
    if code in _RETRY_SQLSTATES or (unique_too and code == _UNIQUE_VIOLATION):
        return True
    if isinstance(orig, sqlite3.OperationalError) and ("locked" in str(orig) or "busy" in str(orig)):
        return True
    return unique_too and isinstance(orig, sqlite3.IntegrityError) and "UNIQUE" in str(orig)


def _install_sqlite_hooks(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql(conn.get_execution_options().get("sqlite_begin", "BEGIN IMMEDIATE"))
