"""The schema comes from Alembic: upgrade/downgrade round-trip, and migrations match the models."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect

from datamesh.models.tables import Base
from datamesh.storage.cp import migrate
from datamesh.storage.cp.database import CpDatabase


def test_upgrade_downgrade_round_trip(cp_url: str) -> None:
    db = CpDatabase.open(cp_url).unwrap()
    assert migrate.upgrade(db).unwrap() == migrate.head_revision(db)
    tables = set(inspect(db.engine).get_table_names())
    assert set(Base.metadata.tables) <= tables
    assert migrate.downgrade(db, "base").unwrap() is None
    assert set(inspect(db.engine).get_table_names()) - {"alembic_version"} == set()
    assert migrate.upgrade(db).unwrap() == migrate.head_revision(db)
    with db.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == [], f"models and migrations differ: {diff}"
    db.dispose()


def test_saga_plans_compress_with_lz4_where_the_server_has_it(pg_url: str) -> None:
    """Migration 0006: ``sagas.plan`` uses lz4 (pglz cost ~12 µs of backend CPU per turn ingested)."""
    db = CpDatabase.open(pg_url).unwrap()
    migrate.upgrade(db).unwrap()
    with db.engine.connect() as conn:
        has_lz4 = conn.exec_driver_sql(
            "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
        ).scalar()
        method = conn.exec_driver_sql(
            "SELECT attcompression FROM pg_attribute WHERE attrelid = 'sagas'::regclass AND attname = 'plan'"
        ).scalar()
    assert method == ("l" if has_lz4 else "")
    assert migrate.downgrade(db, "0005").unwrap() == "0005"
    with db.engine.connect() as conn:
        method = conn.exec_driver_sql(
            "SELECT attcompression FROM pg_attribute WHERE attrelid = 'sagas'::regclass AND attname = 'plan'"
        ).scalar()
    assert method == ""
    db.dispose()
