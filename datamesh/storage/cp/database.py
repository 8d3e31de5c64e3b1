"""The CP tier's database: one engine, one transaction entry point, one error boundary.

Every CP transaction goes through :meth:`CpDatabase.run`, which

* on PostgreSQL runs at ``SERIALIZABLE`` and re-runs the whole transaction on serialization
  failures and deadlocks (SQLSTATE 40001 / 40P01) with full-jitter backoff and a bound;
* on SQLite (local mode) opens write transactions with ``BEGIN IMMEDIATE`` on a WAL database with
  ``synchronous=FULL``, which serialises writers, and retries ``database is locked``;
* translates every SQLAlchemy / DBAPI failure into ``StorageError`` (keeping the cause);
* counts, times and traces each transaction (``tier="cp"``, see ``datamesh.observability``).
* counts attempts and re-runs per operation in :attr:`CpDatabase.stats` (tests and metrics read it);
* on PostgreSQL bounds the wait for ``COMMIT`` by ``commit_timeout_s``: with synchronous replication
  a commit waits until a standby confirms it, and a commit that is not confirmed in time is reported
  as ``StorageError`` (:data:`COMMIT_IN_DOUBT`), never as a success.

Why a client-side timer rather than ``statement_timeout``: PostgreSQL answers a cancelled wait for
synchronous replication with a WARNING and a *successful* commit (the transaction is already durable
on the primary, not yet on a standby).  The timer cancels the wait, sees the warning, discards the
connection and returns the in-doubt error; the caller retries with its idempotency key, which
returns the first result once the commit is replicated.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, event, text
from sqlalchemy.engine import Connection, Engine, RootTransaction, make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.exc import IntegrityError as SAIntegrityError

from datamesh.core.errors import ConfigError, StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.core.retry import RetryPolicy, call_with_retry
from datamesh.observability.instrument import tier_call

T = TypeVar("T")

DEFAULT_TX_POLICY = RetryPolicy(attempts=30, base_s=0.005, cap_s=0.5, deadline_s=60.0)
_RETRY_SQLSTATES = {"40001", "40P01"}
_UNIQUE_VIOLATION = "23505"


#: The message of a commit a synchronous standby did not confirm within the commit timeout.
COMMIT_IN_DOUBT = "commit not acknowledged"
DEFAULT_COMMIT_TIMEOUT_S: float | None = None


class _Retry(Exception):
    """Internal: the transaction hit a transient conflict and is re-run."""


class _CommitInDoubt(Exception):
    """Internal: COMMIT did not return within the commit timeout (a standby did not confirm it)."""


@dataclass(slots=True)
class TxStats:
    """Counters of one :class:`CpDatabase` (per process): transactions, re-runs, in-doubt commits."""

    transactions: int = 0
    retries: int = 0
    in_doubt: int = 0
    retries_by_operation: Counter[str] = field(default_factory=Counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def count(self, *, transactions: int = 0, retry_of: str | None = None, in_doubt: int = 0) -> None:
        with self._lock:
            self.transactions += transactions
            self.in_doubt += in_doubt
            if retry_of is not None:
                self.retries += 1
                self.retries_by_operation[retry_of] += 1

    def snapshot(self) -> dict[str, object]:
        with self._lock:
            return {
                "transactions": self.transactions,
                "retries": self.retries,
                "in_doubt": self.in_doubt,
                "retries_by_operation": dict(self.retries_by_operation),
            }


def is_commit_in_doubt(error: StorageError) -> bool:
    """True for a commit whose outcome is unknown (durable on the primary only, or not at all)."""
    return error.tier == "cp" and error.message.startswith(COMMIT_IN_DOUBT)


def normalize_url(url: str) -> str:
    """``postgresql://`` means psycopg2 (the ``postgresql`` extra), whatever SQLAlchemy defaults to."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        return "postgresql+psycopg2://" + url.split("://", 1)[1]
    return url


class CpDatabase:
    """An engine plus the transaction entry point; create with :meth:`open`."""

    def __init__(
        self,
        engine: Engine,
        *,
        policy: RetryPolicy = DEFAULT_TX_POLICY,
        commit_timeout_s: float | None = DEFAULT_COMMIT_TIMEOUT_S,
    ) -> None:
        self.engine = engine
        self.policy = policy
        self.dialect = engine.dialect.name
        self.commit_timeout_s = commit_timeout_s
        self.stats = TxStats()

    @classmethod
    def open(
        cls,
        url: str,
        *,
        variable: str = "DATAMESH_CP_URL",
        commit_timeout_s: float | None = DEFAULT_COMMIT_TIMEOUT_S,
        policy: RetryPolicy = DEFAULT_TX_POLICY,
        **engine_kwargs: Any,
    ) -> Result[CpDatabase, ConfigError]:
        """Build the engine for ``url`` (SQLite file or PostgreSQL); nothing connects yet.

        ``commit_timeout_s`` bounds how long a PostgreSQL ``COMMIT`` may wait (for a synchronous
        standby); ``None`` waits for ever.
        """
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
        return Ok(cls(engine, policy=policy, commit_timeout_s=commit_timeout_s))

    def run(
        self,
        fn: Callable[[Connection], T],
        *,
        operation: str,
        write: bool = True,
        retry_unique_violation: bool = False,
    ) -> Result[T, StorageError]:
        """Run ``fn`` in one transaction, re-running it whole on transient conflicts.

        ``fn`` must be safe to re-run: it talks only to this database, builds its outputs afresh on
        every call, and any outside effect it has (e.g. deleting an unreferenced blob) is
        idempotent.  With ``retry_unique_violation`` a unique-key race (two writers inserting the
        same key) is re-run too, so the loser sees the winner's row.  A commit a synchronous
        standby did not confirm in time is never re-run (see :data:`COMMIT_IN_DOUBT`).
        """
        first = True

        def attempt() -> T:
            nonlocal first
            if not first:
                self.stats.count(retry_of=operation)
            first = False
            self.stats.count(transactions=1)
            try:
                with self.engine.connect() as conn:
                    if self.dialect == "sqlite":
                        conn = conn.execution_options(sqlite_begin="BEGIN IMMEDIATE" if write else "BEGIN")
                    tx = conn.begin()
                    try:
                        value = fn(conn)
                    except BaseException:
                        with contextlib.suppress(SQLAlchemyError):
                            tx.rollback()
                        raise
                    self._commit(conn, tx)
                    return value
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
            except _CommitInDoubt as exc:
                self.stats.count(in_doubt=1)
                return call.check(
                    Err(StorageError("cp", operation, str(exc), retryable=True, cause=repr(exc.__cause__ or exc)))
                )
            except SQLAlchemyError as exc:
                return call.check(Err(translate(exc, operation)))

    def _commit(self, conn: Connection, tx: RootTransaction) -> None:
        """COMMIT, bounded by ``commit_timeout_s`` on PostgreSQL (see the module docstring)."""
        timeout = self.commit_timeout_s
        if self.dialect != "postgresql" or timeout is None:
            tx.commit()
            return
        dbapi: Any = conn.connection.dbapi_connection
        del dbapi.notices[:]
        fired = threading.Event()

        def cancel() -> None:
            fired.set()
            dbapi.cancel()

        timer = threading.Timer(timeout, cancel)
        timer.daemon = True
        timer.start()
        try:
            tx.commit()
        except DBAPIError as exc:
            if fired.is_set():
                conn.invalidate()
                raise _CommitInDoubt(_in_doubt_message(timeout, "the commit was cancelled")) from exc
            raise
        finally:
            timer.cancel()
            timer.join()
        if fired.is_set():
            # the cancel may still be in flight: never hand this connection to another transaction
            warned = any("synchronous replication" in str(n) for n in dbapi.notices)
            conn.invalidate()
            if warned:
                raise _CommitInDoubt(_in_doubt_message(timeout, "no synchronous standby confirmed it"))

    def ping(self) -> Result[None, StorageError]:
        def select_one(conn: Connection) -> None:
            conn.execute(text("SELECT 1"))

        return self.run(select_one, operation="ping", write=False)

    def dispose(self) -> None:
        """Close pooled connections (also needed after fork: the child must not share sockets)."""
        self.engine.dispose()


def _in_doubt_message(timeout: float, why: str) -> str:
    return (
        f"{COMMIT_IN_DOUBT} within {timeout:g}s ({why}): it may be durable on the primary only; "
        "retry with the same idempotency key once replication is back"
    )


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
