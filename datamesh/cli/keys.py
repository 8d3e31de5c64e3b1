"""``python -m datamesh keys create|list|revoke``: API keys of the CP tier's access control."""

from __future__ import annotations

import argparse
from datetime import UTC, datetime, timedelta
from typing import Any

from datamesh.core.config import DataMeshConfig
from datamesh.core.principal import Role
from datamesh.core.result import Err
from datamesh.pipeline.tiers import check_schema
from datamesh.storage.cp import migrate
from datamesh.storage.cp.access import AccessControl
from datamesh.storage.cp.database import CpDatabase


def register(sub: Any) -> None:
    k = sub.add_parser("keys", help="create, list or revoke API keys")
    ks = k.add_subparsers(dest="keys_action", metavar="ACTION", required=True)

    c = ks.add_parser("create", help="issue a key (shown once) for a principal, granting it a role")
    c.add_argument("--tenant", help="tenant (default: DATAMESH_TENANT)")
    c.add_argument("--principal", required=True, help="principal name (created when missing)")
    c.add_argument("--role", choices=[r.value for r in Role], default=Role.WRITER.value)
    c.add_argument("--entity", action="append", help="narrow the grant to this entity id (repeatable)")
    c.add_argument("--expires-in-days", type=float, help="the key stops working after this many days")
    c.add_argument("--label", default="")
    c.set_defaults(handler=_create)

    ls = ks.add_parser("list", help="list keys (never their secrets)")
    ls.add_argument("--tenant", help="only this tenant's keys")
    ls.set_defaults(handler=_list)

    r = ks.add_parser("revoke", help="revoke a key by its id")
    r.add_argument("key_id")
    r.add_argument("--tenant", help="only if the key belongs to this tenant")
    r.set_defaults(handler=_revoke)


def _open(config: DataMeshConfig) -> tuple[CpDatabase, AccessControl] | None:
    db = CpDatabase.open(config.resolved_cp_url)
    if isinstance(db, Err):
        print(f"error: {db.error}")
        return None
    ready = migrate.upgrade(db.value) if db.value.dialect == "sqlite" else check_schema(db.value)
    if isinstance(ready, Err):
        print(f"error: {ready.error}")
        db.value.dispose()
        return None
    return db.value, AccessControl(db.value)


def _create(args: argparse.Namespace, config: DataMeshConfig) -> int:
    opened = _open(config)
    if opened is None:
        return 2
    db, access = opened
    try:
        tenant = args.tenant or config.tenant
        for entity in args.entity or [None]:
            granted = access.grant(tenant, args.principal, Role(args.role), entity_id=entity)
            if isinstance(granted, Err):
                print(f"error: {granted.error}")
                return 1
        expires = timedelta(days=args.expires_in_days) if args.expires_in_days is not None else None
        issued = access.issue_key(tenant, args.principal, expires_in=expires, label=args.label)
        if isinstance(issued, Err):
            print(f"error: {issued.error}")
            return 1
        key = issued.value
        print(f"key id:    {key.key_id}")
        print(f"tenant:    {key.tenant}")
        print(f"principal: {key.principal} (role {args.role})")
        print(f"expires:   {key.expires_at.isoformat() if key.expires_at else 'never'}")
        print(f"api key:   {key.raw}")
        print("The key is shown once; only its hash is stored.")
        return 0
    finally:
        db.dispose()


def _list(args: argparse.Namespace, config: DataMeshConfig) -> int:
    opened = _open(config)
    if opened is None:
        return 2
    db, access = opened
    try:
        keys = access.list_keys(args.tenant)
        if isinstance(keys, Err):
            print(f"error: {keys.error}")
            return 1
        now = datetime.now(UTC)
        print(f"{'key id':16}  {'tenant':16} {'principal':16} {'state':8} {'expires':25} label")
        for k in keys.value:
            expires = k.expires_at.isoformat(timespec="seconds") if k.expires_at else "never"
            print(f"{k.key_id:16}  {k.tenant:16} {k.principal:16} {k.state(now):8} {expires:25} {k.label}")
        print(f"{len(keys.value)} keys")
        return 0
    finally:
        db.dispose()


def _revoke(args: argparse.Namespace, config: DataMeshConfig) -> int:
    opened = _open(config)
    if opened is None:
        return 2
    db, access = opened
    try:
        done = access.revoke_key(args.key_id, tenant=args.tenant)
        if isinstance(done, Err):
            print(f"error: {done.error}")
            return 1
        print(f"revoked {args.key_id}")
        return 0
    finally:
        db.dispose()
