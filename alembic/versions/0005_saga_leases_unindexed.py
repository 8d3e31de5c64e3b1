"""Saga lease renewals no longer touch an index; saga pages keep room for in-place updates.

Every saga step renews its saga's lease.  With ``lease_expires_at`` in ``ix_sagas_status_lease``
each renewal wrote new index entries, and under SERIALIZABLE those writes conflicted with every
concurrent transaction that had read a saga through the same (recent, shared) index pages: about
two dozen aborted transactions per 40,000 conversations ingested in 5,000-turn batches through
Celery.  The reaper's lookup of expired sagas uses ``ix_sagas_status_created_at`` (in-flight sagas
are few) and filters the lease.  ``fillfactor`` 70 on ``sagas`` and ``saga_steps`` (PostgreSQL)
leaves room for renewals and step updates to stay on their page (HOT: no new index entries).

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-27 02:30:00
"""

from __future__ import annotations

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_TABLES = ("sagas", "saga_steps")


def upgrade() -> None:
    with op.batch_alter_table("sagas") as batch_op:
        batch_op.drop_index("ix_sagas_status_lease")
    if op.get_bind().dialect.name == "postgresql":
        for table in _TABLES:
            op.execute(f'ALTER TABLE "{table}" SET (fillfactor = 70)')


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in _TABLES:
            op.execute(f'ALTER TABLE "{table}" RESET (fillfactor)')
    with op.batch_alter_table("sagas") as batch_op:
        batch_op.create_index("ix_sagas_status_lease", ["status", "lease_expires_at"], unique=False)
