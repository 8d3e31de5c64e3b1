"""Access control in the CP tier: tenants, principals, grants and API keys.

An API key looks like ``dmk_<key id>_<secret>``: the key id (public, 16 hex digits) finds the row,
the secret (32 random bytes, URL-safe base64) is checked against the stored SHA-256 with
:func:`hmac.compare_digest`.  Only the hash is stored; :meth:`AccessControl.issue_key` returns the
key once.  A high-entropy secret needs no slow password hash: SHA-256 cannot be brute-forced back.

:meth:`AccessControl.authenticate` turns a key into a :class:`~datamesh.core.principal.Principal`
(tenant, roles from the grants, entities narrowed when every grant is narrowed) or
``Err(AccessDenied)`` for an unknown, malformed, wrong, expired or revoked key.  A CP failure is
``Err(StorageError)``: the caller can tell "refused" from "cannot check now".
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import partial
from typing import cast

from sqlalchemy import Table, select, update
from sqlalchemy.engine import Connection

from datamesh.core.errors import AccessDenied, NotFound, StorageError, ValidationError
from datamesh.core.principal import Principal, Role
from datamesh.core.result import Err, Ok, Result
from datamesh.models.access import ApiKey, Grant, PrincipalRecord, Tenant
from datamesh.storage.cp.database import CpDatabase

TENANTS = cast(Table, Tenant.__table__)
PRINCIPALS = cast(Table, PrincipalRecord.__table__)
GRANTS = cast(Table, Grant.__table__)
KEYS = cast(Table, ApiKey.__table__)

KEY_PREFIX = "dmk"
_KEY_RE = re.compile(r"^dmk_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just issued: ``raw`` is shown once and never stored."""

    key_id: str
    raw: str
    tenant: str
    principal: str
    expires_at: datetime | None


@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What may be listed about a key (never the secret or its hash)."""

    key_id: str
    tenant: str
    principal: str
    label: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def state(self, now: datetime) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and _aware(self.expires_at) <= now:
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class Authenticated:
    """A valid key: its id (for per-key limits), principal, and expiry (for caches)."""

    key_id: str
    principal: Principal
    expires_at: datetime | None


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse_key(raw: str) -> tuple[str, str] | None:
    """``(key_id, secret)`` of a well-formed key, else ``None``."""
    match = _KEY_RE.match(raw)
    return (match.group(1), match.group(2)) if match else None


class AccessControl:
    """Access-control operations over a :class:`CpDatabase`; each returns a ``Result``."""

    def __init__(self, db: CpDatabase) -> None:
        self.db = db

    # ---- tenants, principals, grants --------------------------------------------------------

    def ensure_tenant(self, tenant: str) -> Result[None, ValidationError | StorageError]:
        """Create ``tenant`` unless it exists."""
        if not _NAME_RE.match(tenant):
            return Err(ValidationError("tenant", "expected 1-64 letters, digits, '-' or '_'"))
        return self.db.run(
            partial(_ensure_tenant, tenant=tenant), operation="access.tenant", retry_unique_violation=True
        )

    def ensure_principal(self, tenant: str, name: str) -> Result[str, ValidationError | StorageError]:
        """The id of principal ``name`` of ``tenant``, creating both when missing."""
        if not _NAME_RE.match(name):
            return Err(ValidationError("principal", "expected 1-64 letters, digits, '-' or '_'"))
        made = self.ensure_tenant(tenant)
        if isinstance(made, Err):
            return made
        return self.db.run(
            partial(_ensure_principal, tenant=tenant, name=name),
            operation="access.principal",
            retry_unique_violation=True,
        )

    def grant(
        self, tenant: str, principal: str, role: Role, *, entity_id: str | None = None
    ) -> Result[None, ValidationError | StorageError]:
        """Give ``principal`` the ``role`` (on one entity when ``entity_id`` is given)."""
        pid = self.ensure_principal(tenant, principal)
        if isinstance(pid, Err):
            return pid
        if entity_id is not None:
            try:
                entity_id = str(uuid.UUID(entity_id))
            except ValueError:
                return Err(ValidationError("entity_id", "expected a UUID"))
        return self.db.run(
            partial(_grant, principal_id=pid.value, role=Role(role).value, entity_id=entity_id),
            operation="access.grant",
        )

    # ---- keys ---------------------------------------------------------------------------------

    def issue_key(
        self, tenant: str, principal: str, *, expires_in: timedelta | None = None, label: str = ""
    ) -> Result[IssuedKey, ValidationError | StorageError]:
        """A new key for ``principal`` of ``tenant`` (both created when missing); shown once."""
        pid = self.ensure_principal(tenant, principal)
        if isinstance(pid, Err):
            return pid
        key_id = secrets.token_hex(8)
        secret = secrets.token_urlsafe(32)
        now = _now()
        expires_at = now + expires_in if expires_in is not None else None
        row = {
            "id": key_id,
            "tenant": tenant,
            "principal_id": pid.value,
            "secret_sha256": hash_secret(secret),
            "label": label[:200],
            "created_at": now,
            "expires_at": expires_at,
            "revoked_at": None,
        }
        stored = self.db.run(lambda conn: conn.execute(KEYS.insert(), [row]), operation="access.issue_key")
        if isinstance(stored, Err):
            return stored
        return Ok(IssuedKey(key_id, f"{KEY_PREFIX}_{key_id}_{secret}", tenant, principal, expires_at))

    def list_keys(self, tenant: str | None = None) -> Result[list[KeyInfo], StorageError]:
        return self.db.run(partial(_list_keys, tenant=tenant), operation="access.list_keys", write=False)

    def revoke_key(self, key_id: str, *, tenant: str | None = None) -> Result[None, NotFound | StorageError]:
        """Revoke ``key_id`` (only within ``tenant`` when given); revoking twice is harmless."""
        done = self.db.run(partial(_revoke, key_id=key_id, tenant=tenant), operation="access.revoke_key")
        if isinstance(done, Err):
            return done
        return Ok(None) if done.value else Err(NotFound("api key", key_id))

    def authenticate(
        self, raw_key: str, *, now: datetime | None = None
    ) -> Result[Principal, AccessDenied | StorageError]:
        """The principal behind ``raw_key``, or ``Err(AccessDenied)`` saying why not."""
        found = self.authenticate_key(raw_key, now=now)
        return Ok(found.value.principal) if isinstance(found, Ok) else found

    def authenticate_key(
        self, raw_key: str, *, now: datetime | None = None
    ) -> Result[Authenticated, AccessDenied | StorageError]:
        """Like :meth:`authenticate`, with the key id and expiry (for per-key limits and caches)."""
        parsed = parse_key(raw_key) if isinstance(raw_key, str) else None
        if parsed is None:
            return Err(AccessDenied("authenticate", "malformed API key"))
        key_id, secret = parsed
        loaded = self.db.run(partial(_load_key, key_id=key_id), operation="access.authenticate", write=False)
        if isinstance(loaded, Err):
            return loaded
        if loaded.value is None:
            return Err(AccessDenied("authenticate", "unknown API key"))
        key, principal, grants = loaded.value
        if not hmac.compare_digest(hash_secret(secret), key.secret_sha256):
            return Err(AccessDenied("authenticate", "unknown API key"))
        at = now or _now()
        if key.revoked_at is not None:
            return Err(AccessDenied("authenticate", f"API key {key_id} was revoked"))
        if key.expires_at is not None and _aware(key.expires_at) <= at:
            return Err(AccessDenied("authenticate", f"API key {key_id} expired"))
        roles = frozenset(Role(role) for role, _ in grants)
        narrowed = [entity for _, entity in grants]
        entities = None if not grants or None in narrowed else frozenset(e for e in narrowed if e is not None)
        who = Principal(tenant=key.tenant, name=principal, roles=roles, entities=entities)
        return Ok(Authenticated(key_id, who, _aware(key.expires_at) if key.expires_at else None))


# ---- transactions (each re-runnable) ------------------------------------------------------------


def _ensure_tenant(conn: Connection, tenant: str) -> None:
    if conn.execute(select(TENANTS.c.name).where(TENANTS.c.name == tenant)).first() is None:
        conn.execute(TENANTS.insert(), [{"name": tenant, "created_at": _now()}])


def _ensure_principal(conn: Connection, tenant: str, name: str) -> str:
    row = conn.execute(select(PRINCIPALS.c.id).where(PRINCIPALS.c.tenant == tenant, PRINCIPALS.c.name == name)).first()
    if row is not None:
        return str(row.id)
    pid = str(uuid.uuid4())
    conn.execute(PRINCIPALS.insert(), [{"id": pid, "tenant": tenant, "name": name, "created_at": _now()}])
    return pid


def _grant(conn: Connection, principal_id: str, role: str, entity_id: str | None) -> None:
    existing = conn.execute(
        select(GRANTS.c.id).where(
            GRANTS.c.principal_id == principal_id,
            GRANTS.c.role == role,
            GRANTS.c.entity_id.is_(None) if entity_id is None else GRANTS.c.entity_id == entity_id,
        )
    ).first()
    if existing is None:
        conn.execute(
            GRANTS.insert(),
            [{"principal_id": principal_id, "role": role, "entity_id": entity_id, "created_at": _now()}],
        )


def _list_keys(conn: Connection, tenant: str | None) -> list[KeyInfo]:
    query = (
        select(KEYS, PRINCIPALS.c.name.label("principal_name"))
        .join(PRINCIPALS, PRINCIPALS.c.id == KEYS.c.principal_id)
        .order_by(KEYS.c.tenant, KEYS.c.created_at)
    )
    if tenant is not None:
        query = query.where(KEYS.c.tenant == tenant)
    return [
        KeyInfo(r.id, r.tenant, r.principal_name, r.label, r.created_at, r.expires_at, r.revoked_at)
        for r in conn.execute(query)
    ]


def _revoke(conn: Connection, key_id: str, tenant: str | None) -> bool:
    where = [KEYS.c.id == key_id]
    if tenant is not None:
        where.append(KEYS.c.tenant == tenant)
    if conn.execute(select(KEYS.c.id).where(*where)).first() is None:
        return False
    conn.execute(update(KEYS).where(*where, KEYS.c.revoked_at.is_(None)).values(revoked_at=_now()))
    return True


def _load_key(conn: Connection, key_id: str) -> tuple[ApiKeyRow, str, Sequence[tuple[str, str | None]]] | None:
    row = conn.execute(
        select(KEYS, PRINCIPALS.c.name.label("principal_name"))
        .join(PRINCIPALS, PRINCIPALS.c.id == KEYS.c.principal_id)
        .where(KEYS.c.id == key_id)
    ).first()
    if row is None:
        return None
    grants = conn.execute(select(GRANTS.c.role, GRANTS.c.entity_id).where(GRANTS.c.principal_id == row.principal_id))
    key = ApiKeyRow(row.tenant, row.secret_sha256, row.expires_at, row.revoked_at)
    return key, str(row.principal_name), [(str(g.role), g.entity_id) for g in grants]


@dataclass(frozen=True, slots=True)
class ApiKeyRow:
    tenant: str
    secret_sha256: str
    expires_at: datetime | None
    revoked_at: datetime | None


def _now() -> datetime:
    return datetime.now(UTC)


def _aware(value: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
