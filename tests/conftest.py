"""Shared fixtures: real PostgreSQL and per-test storage roots.

Services are real.  Locally a missing service skips the tests that need it; under ``CI=true`` it
fails them (a green CI run must have exercised every tier).
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import pytest
from sqlalchemy import create_engine, text

from datamesh.core.config import DataMeshConfig
from datamesh.core.result import Err
from datamesh.storage.cp import migrate
from datamesh.storage.cp.database import CpDatabase

if TYPE_CHECKING:
    from tests.celery.test_broker_restart import OwnRedis

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
PG_ADMIN_URL = os.environ.get("DATAMESH_TEST_PG_URL", "postgresql+psycopg2://postgres@127.0.0.1:5432/test")


def service_missing(name: str, exc: BaseException) -> NoReturn:
    """Fail under CI, skip locally."""
    message = f"{name} is not available: {exc}"
    if CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def pg_admin_engine() -> Iterator[object]:
    engine = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        engine.dispose()
        service_missing("PostgreSQL on 127.0.0.1:5432 (database test)", exc)
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin_engine: object) -> Iterator[str]:
    """A fresh schema in database ``test`` for one test; dropped afterwards."""
    schema = f"dm_{uuid.uuid4().hex[:12]}"
    with pg_admin_engine.connect() as conn:  # type: ignore[attr-defined]
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    yield f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    with pg_admin_engine.connect() as conn:  # type: ignore[attr-defined]
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))


@pytest.fixture
def pg_cp_url(pg_url: str) -> str:
    """A fresh PostgreSQL schema migrated to the latest revision (PostgreSQL-only tests)."""
    db = CpDatabase.open(pg_url).unwrap()
    migrated = migrate.upgrade(db)
    db.dispose()
    if isinstance(migrated, Err):
        pytest.fail(f"migration failed: {migrated.error}")
    return pg_url


@pytest.fixture(params=["sqlite", "postgresql"])
def cp_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The CP database URL: each test using it runs on SQLite and on the real PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'cp.sqlite3'}"
    url: str = request.getfixturevalue("pg_url")
    db = CpDatabase.open(url).unwrap()
    migrated = migrate.upgrade(db)
    db.dispose()
    if isinstance(migrated, Err):
        pytest.fail(f"migration failed: {migrated.error}")
    return url


@pytest.fixture
def config(tmp_path: Path, cp_url: str) -> DataMeshConfig:
    return DataMeshConfig(data_dir=tmp_path / "data", cp_url=cp_url)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    """A ``redis-server`` of the test's own on a spare port, with docker-compose.yml's broker settings
    (for tests that kill, cut or restart the broker; never the shared server)."""
    from tests.celery.test_broker_restart import OwnRedis

    if shutil.which("redis-server") is None:
        service_missing("redis-server binary", FileNotFoundError("redis-server"))
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()
