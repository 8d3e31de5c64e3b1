"""The index outbox: index work written in the same transaction as the CP commit that owes it.

The saga's pivot (``commit_cp``) inserts one ``add`` row per region; erasure inserts
``erase_conversation`` / ``erase_entity`` rows.  The indexer (``datamesh/pipeline/indexer.py``)
claims rows by ``next_attempt_at`` and deletes them once done; ``index status`` and the lag
gauge read the depth and oldest row per region (``region, enqueued_at``).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 16:30:00
"""

from __future__ import annotations

import sqlalchemy as sa

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "index_outbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("op", sa.String(length=24), nullable=False),
        sa.Column("key", sa.String(length=36), nullable=False),
        sa.Column("region", sa.String(length=32), nullable=False),
        sa.Column("tenant", sa.String(length=64), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("enqueued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_index_outbox")),
    )
    op.create_index("ix_index_outbox_next_attempt_at", "index_outbox", ["next_attempt_at"], unique=False)
    op.create_index("ix_index_outbox_region_enqueued_at", "index_outbox", ["region", "enqueued_at"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_index_outbox_region_enqueued_at", table_name="index_outbox")
    op.drop_index("ix_index_outbox_next_attempt_at", table_name="index_outbox")
    op.drop_table("index_outbox")
