"""Alembic environment for the CP tier.

The URL comes, in order, from a connection handed in by datamesh (``config.attributes``), from
``-x url=...``, or from ``DATAMESH_CP_URL`` (via :meth:`DataMeshConfig.from_env`).
"""

from __future__ import annotations

from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

import datamesh.models  # noqa: F401  (registers every table)
from alembic import context
from datamesh.core.config import DataMeshConfig
from datamesh.models.tables import Base

target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_online() -> None:
    given = context.config.attributes.get("connection")
    if given is not None:
        _run(given)
        return
    url = context.get_x_argument(as_dictionary=True).get("url")
    if not url:
        url = DataMeshConfig.from_env().unwrap().resolved_cp_url
    engine = create_engine(url)
    with engine.connect() as connection:
        _run(connection)
    engine.dispose()


def run_offline() -> None:
    url = context.get_x_argument(as_dictionary=True).get("url") or DataMeshConfig.from_env().unwrap().resolved_cp_url
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
