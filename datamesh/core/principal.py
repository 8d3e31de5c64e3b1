"""Who is calling: a principal of a tenant with roles.

Every read and write of the pipeline is made on behalf of a :class:`Principal`.  Embedded local
mode uses :meth:`Principal.local_default` (an admin of the configured tenant) so the seed example
needs no credentials; the gateway authenticates an API key into a principal.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    WRITER = "writer"
    READER = "reader"


class Action(StrEnum):
    READ = "read"
    WRITE = "write"
    ADMIN = "admin"


_ALLOWED: dict[Role, frozenset[Action]] = {
    Role.ADMIN: frozenset(Action),
    Role.WRITER: frozenset({Action.READ, Action.WRITE}),
    Role.READER: frozenset({Action.READ}),
}


@dataclass(frozen=True, slots=True)
class Principal:
    """A caller: ``name`` within ``tenant``, allowed what its ``roles`` allow.

    ``entities`` narrows access to the listed entity ids (``None``: every entity of the tenant).
    """

    tenant: str
    name: str
    roles: frozenset[Role]
    entities: frozenset[str] | None = field(default=None)

    def can(self, action: Action) -> bool:
        return any(action in _ALLOWED[role] for role in self.roles)

    def sees_entity(self, entity_id: str) -> bool:
        return self.entities is None or entity_id in self.entities

    @classmethod
    def local_default(cls, tenant: str) -> Principal:
        """The embedded-mode caller: an admin of ``tenant``."""
        return cls(tenant=tenant, name="local", roles=frozenset({Role.ADMIN}))
