"""Saga plans are TOAST-compressed with lz4 instead of pglz (PostgreSQL, when the server has lz4).

A saga's plan (``sagas.plan``) is written once, by ``reserve``, and is large: ~2.2 MB of JSON for a
5,000-turn batch (ids and hashes, which compress poorly).  PostgreSQL compresses it before storing it
out of line, with pglz by default: measured on PostgreSQL 15, ~60 ms more backend CPU per such
plan than storing it uncompressed (~12 µs per conversation ingested, of the ~95-115 µs PostgreSQL
spends), where lz4 costs ~6 ms and stores it a little smaller.  The value read back is the same
text; rows written before keep pglz (each datum records its method) and read as before.  Servers
built without lz4 (or older than 14) keep the default.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-27 12:03:00
"""

from __future__ import annotations

from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _has_lz4() -> bool:
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    found = bind.exec_driver_sql(
        "SELECT 'lz4' = ANY(enumvals) FROM pg_settings WHERE name = 'default_toast_compression'"
    ).scalar()
    return bool(found)


def upgrade() -> None:
    if _has_lz4():  # a catalog change only: no rewrite of existing rows
        op.execute('ALTER TABLE "sagas" ALTER COLUMN "plan" SET COMPRESSION lz4')


def downgrade() -> None:
    if _has_lz4():
        op.execute('ALTER TABLE "sagas" ALTER COLUMN "plan" SET COMPRESSION default')
