"""Run the Alembic migrations of the CP tier from code (``python -m datamesh migrate``)."""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.exc import SQLAlchemyError

from alembic import command
from datamesh.core.errors import StorageError
from datamesh.core.result import Err, Ok, Result
from datamesh.storage.cp.database import CpDatabase, translate

SCRIPT_LOCATION = Path(__file__).resolve().parents[3] / "alembic"


def alembic_config(db: CpDatabase) -> Config:
    if not (SCRIPT_LOCATION / "env.py").is_file():
        raise FileNotFoundError(f"Alembic scripts not found at {SCRIPT_LOCATION}; install from a source checkout")
    config = Config()
    config.set_main_option("script_location", str(SCRIPT_LOCATION))
    config.set_main_option("path_separator", "os")
    return config


def head_revision(db: CpDatabase) -> str | None:
    return ScriptDirectory.from_config(alembic_config(db)).get_current_head()


def current_revision(db: CpDatabase) -> Result[str | None, StorageError]:
    try:
        with db.engine.connect() as conn:
            return Ok(MigrationContext.configure(conn).get_current_revision())
    except SQLAlchemyError as exc:
        return Err(translate(exc, "current_revision"))


def upgrade(db: CpDatabase, revision: str = "head") -> Result[str | None, StorageError]:
    """Migrate the database to ``revision``; returns the revision reached."""
    return _run(db, lambda cfg: command.upgrade(cfg, revision), "migrate.upgrade")


def downgrade(db: CpDatabase, revision: str) -> Result[str | None, StorageError]:
    return _run(db, lambda cfg: command.downgrade(cfg, revision), "migrate.downgrade")


def _run(db: CpDatabase, action: object, operation: str) -> Result[str | None, StorageError]:
    config = alembic_config(db)
    try:
        with db.engine.begin() as conn:
            config.attributes["connection"] = conn
            action(config)  # type: ignore[operator]
    except SQLAlchemyError as exc:
        return Err(translate(exc, operation))
    return current_revision(db)
