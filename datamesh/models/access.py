"""SQLAlchemy models of access control in the CP tier: who may do what.

Tenants own principals; a principal holds grants of roles (``admin``, ``writer``, ``reader``),
each optionally narrowed to one entity id; a principal authenticates with API keys, of which only
a SHA-256 of the secret part is stored (the key itself is shown once, when it is issued).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import DateTime, ForeignKey, Index, Integer, String, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from datamesh.models.tables import HASH, ID, Base

NAME = String(64)


class Tenant(Base):
    """An isolation boundary: nothing of one tenant is visible to another's principals."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(NAME, primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class PrincipalRecord(Base):
    """A user or service of a tenant; what it may do comes from its grants."""

    __tablename__ = "principals"

    id: Mapped[str] = mapped_column(ID, primary_key=True)
    tenant: Mapped[str] = mapped_column(NAME, ForeignKey("tenants.name"))
    name: Mapped[str] = mapped_column(NAME)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (UniqueConstraint("tenant", "name"),)


class RoleRecord(Base):
    """A named set of actions (the mapping lives in :mod:`datamesh.core.principal`)."""

    __tablename__ = "roles"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    description: Mapped[str] = mapped_column(String(200))


class Grant(Base):
    """Principal ``principal_id`` holds ``role``, on every entity or only on ``entity_id``."""

    __tablename__ = "grants"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    principal_id: Mapped[str] = mapped_column(ID, ForeignKey("principals.id"))
    role: Mapped[str] = mapped_column(String(32), ForeignKey("roles.name"))
    entity_id: Mapped[str | None] = mapped_column(ID, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))

    __table_args__ = (Index("ix_grants_principal_id", "principal_id"),)


class ApiKey(Base):
    """An API key: ``id`` is the public prefix used for lookup, ``secret_sha256`` the only secret kept."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(NAME, ForeignKey("tenants.name"))
    principal_id: Mapped[str] = mapped_column(ID, ForeignKey("principals.id"))
    secret_sha256: Mapped[str] = mapped_column(HASH)
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (Index("ix_api_keys_tenant", "tenant"), Index("ix_api_keys_principal_id", "principal_id"))
