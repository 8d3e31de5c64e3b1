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
