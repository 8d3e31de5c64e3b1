"""Indexes for every CP query the code makes that the initial schema did not cover.

Listing sagas by state (``python -m datamesh sagas --status/--dead``) filters on ``status`` and
orders by ``created_at``: ``ix_sagas_status_created_at``.  Every other lookup is served by a
primary key, a unique constraint or an index of 0001 (``tests/test_cp_indexes.py`` checks each
statement with EXPLAIN on PostgreSQL).

Also, on PostgreSQL, the saga plan (megabytes for a batch of 10,000 turns, written once in the
``reserve`` transaction) is compressed with lz4 instead of pglz where the server supports it: a
faster write, for the same data.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 15:45:00
"""

from __future__ import annotations

from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


_PLAN_COMPRESSION = """
DO $$ BEGIN
    ALTER TABLE sagas ALTER COLUMN plan SET COMPRESSION {method};
EXCEPTION WHEN feature_not_supported THEN NULL;  -- a server built without lz4 keeps pglz
END $$
"""


def upgrade() -> None:
    with op.batch_alter_table("sagas", schema=None) as batch_op:
        batch_op.create_index("ix_sagas_status_created_at", ["status", "created_at"], unique=False)
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PLAN_COMPRESSION.format(method="lz4"))


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(_PLAN_COMPRESSION.format(method="pglz"))
    with op.batch_alter_table("sagas", schema=None) as batch_op:
        batch_op.drop_index("ix_sagas_status_created_at")
