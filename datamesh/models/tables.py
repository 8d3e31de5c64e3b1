"""SQLAlchemy models of the CP tier: what must never be wrong.

Conversations and their turns (ids, owner, region, sizes, SHA-256 of the content, where the
content lives), the provenance chain of each conversation, idempotency keys, the saga log, and the
object-store references that keep shared blobs alive.  The schema is created by the Alembic
migrations in ``alembic/versions``; nothing calls ``create_all`` on a user's database.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

ID = String(36)
HASH = String(64)
NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Conversation(Base):
    """A conversation; visible once its row commits (the saga's pivot)."""

    __tablename__ = "conversations"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64))
    entity_id: Mapped[str] = mapped_column(ID)
    region: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="active")
    turn_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_conversations_tenant_entity", "tenant", "entity_id"),)


class Turn(Base):
    """One prompt/response turn; content lives in the AP tier or the object store."""

    __tablename__ = "turns"

    conversation_id: Mapped[str] = mapped_column(ID, ForeignKey("conversations.id"), primary_key=True)
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    turn_id: Mapped[str] = mapped_column(ID, unique=True)
    saga_id: Mapped[str] = mapped_column(ID)
    prompt_sha256: Mapped[str] = mapped_column(HASH)
    prompt_size: Mapped[int] = mapped_column(BigInteger)
    prompt_location: Mapped[str] = mapped_column(String(16))
    response_sha256: Mapped[str] = mapped_column(HASH)
    response_size: Mapped[int] = mapped_column(BigInteger)
    response_location: Mapped[str] = mapped_column(String(16))
    ap_shard: Mapped[int] = mapped_column(Integer)
    has_embedding: Mapped[bool] = mapped_column(default=False)
    metadata_json: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_turns_saga_id", "saga_id"),)


class ProvenanceRecord(Base):
    """One link of a conversation's append-only, hash-chained provenance."""

    __tablename__ = "provenance_records"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    conversation_id: Mapped[str] = mapped_column(ID, ForeignKey("conversations.id"))
    seq: Mapped[int] = mapped_column(Integer)
    kind: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(HASH)
    record_hash: Mapped[str] = mapped_column(HASH)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        UniqueConstraint("conversation_id", "seq"),
        UniqueConstraint("conversation_id", "prev_hash"),
    )


class IdempotencyKey(Base):
    """A request's idempotency key and the first result's ids; completed when its saga has committed."""

    __tablename__ = "idempotency_keys"

    tenant: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(200), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(HASH)
    saga_id: Mapped[str] = mapped_column(ID)
    status: Mapped[str] = mapped_column(String(16))
    conversation_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    turn_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    turn_seq: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_idempotency_keys_saga_id", "saga_id"),)


class Saga(Base):
    """The saga log: one row per ingest saga; the record, never Celery's result backend."""

    __tablename__ = "sagas"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16))
    tenant: Mapped[str] = mapped_column(String(64))
    plan: Mapped[str] = mapped_column(Text)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    failed_step: Mapped[str | None] = mapped_column(String(32), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    lease_expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    # No index holds ``lease_expires_at``: every step renews the lease, and an indexed column would
    # make each renewal a new index entry (a non-HOT update), which under SERIALIZABLE put every
    # step's transaction in conflict with every other one reading a saga (all recent sagas share
    # index pages).  The reaper finds in-flight sagas by ``status`` and filters the lease; pages
    # are left 30% free so renewals can stay on their page (HOT).
    __table_args__ = (
        Index("ix_sagas_status_created_at", "status", "created_at"),
        {"postgresql_with": {"fillfactor": 70}},
    )


class SagaStep(Base):
    """The state of one step of a saga, written with that step's CP writes."""

    __tablename__ = "saga_steps"
    __table_args__ = ({"postgresql_with": {"fillfactor": 70}},)  # steps are updated in place (HOT)

    saga_id: Mapped[str] = mapped_column(ID, ForeignKey("sagas.id"), primary_key=True)
    step: Mapped[str] = mapped_column(String(32), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Blob(Base):
    """An object-store blob known to the CP tier; locked while references change."""

    __tablename__ = "blobs"

    region: Mapped[str] = mapped_column(String(32), primary_key=True)
    content_hash: Mapped[str] = mapped_column(HASH, primary_key=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class ObjectRef(Base):
    """A saga's reference to a blob; a blob with no reference may be garbage-collected."""

    __tablename__ = "object_refs"

    region: Mapped[str] = mapped_column(String(32), primary_key=True)
    content_hash: Mapped[str] = mapped_column(HASH, primary_key=True)
    saga_id: Mapped[str] = mapped_column(ID, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_object_refs_saga_id", "saga_id"),)


class IndexOutbox(Base):
    """Index work owed after a CP commit (transactional outbox), drained by the indexer.

    ``op``: ``add`` (index the turns of saga ``key``), ``erase_conversation`` or ``erase_entity``
    (delete AP content and index entries of conversation / entity ``key``).  A row is claimed by
    moving ``next_attempt_at`` past a lease, and deleted when its work is done.
    """

    __tablename__ = "index_outbox"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    op: Mapped[str] = mapped_column(String(24))
    key: Mapped[str] = mapped_column(ID)
    region: Mapped[str] = mapped_column(String(32))
    tenant: Mapped[str] = mapped_column(String(64))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    enqueued_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (
        Index("ix_index_outbox_next_attempt_at", "next_attempt_at"),
        Index("ix_index_outbox_region_enqueued_at", "region", "enqueued_at"),
    )
