"""Stateless scale-out: two gateway instances, one Redis, one PostgreSQL.

Given a key with a burst of 20 and (almost) no refill, when 60 requests are spread concurrently
over two instances, then exactly 20 are accepted in total: the bucket lives in Redis and the Lua
script takes tokens atomically, so the instances cannot both spend the same token.  A key issued
and then revoked through one database is honoured and refused by both instances.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from datamesh.core.principal import Role
from datamesh.storage.cp.access import AccessControl
from datamesh.storage.cp.database import CpDatabase
from tests.gateway_support import Server, clean_redis, pg_schema, serve, turn

BURST = 20


@pytest.fixture
def two_instances(tmp_path: Path) -> Iterator[tuple[str, list[Server]]]:
    with pg_schema() as cp:
        env = {
            "DATAMESH_CP_URL": cp,
            "DATAMESH_RATE_LIMIT_REDIS_URL": clean_redis(),
            "DATAMESH_RATE_LIMIT_KEY_BURST": str(BURST),
            "DATAMESH_RATE_LIMIT_KEY_RATE": "0.001",
            "DATAMESH_GATEWAY_AUTH_CACHE_S": "0.5",
            # Local-mode instances with folders of their own: neither could index the other's turns.
            "DATAMESH_INDEXER": "off",
        }
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
        with serve(tmp_path / "a", **env) as a, serve(tmp_path / "b", **env) as b:
            yield cp, [a, b]


def test_the_combined_limit_holds_across_instances(two_instances: tuple[str, list[Server]]) -> None:
    cp, servers = two_instances
    db = CpDatabase.open(cp).unwrap()
    access = AccessControl(db)
    access.grant("scale", "client", Role.WRITER).unwrap()
    raw = access.issue_key("scale", "client").unwrap().raw
    clients = [httpx.Client(base_url=s.url, headers={"Authorization": f"Bearer {raw}"}, timeout=30) for s in servers]

    retryable: list[str] = []

    def post(i: int) -> tuple[int, int]:
        response = clients[i % 2].post("/v1/conversations", json=turn())
        if response.status_code == 503:  # admitted, then a tier was briefly unavailable (a loaded box)
            assert "Retry-After" in response.headers, response.text
            retryable.append(response.text)
        return i % 2, response.status_code

    try:
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(post, range(3 * BURST)))
    finally:
        for c in clients:
            c.close()
    codes = Counter(code for _, code in results)
    per_instance = Counter(instance for instance, code in results if code == 201)
    # Exactly BURST requests got a token: accepted, or (rarely) admitted and then refused retryably;
    # every other one was limited.
    assert codes[429] == 2 * BURST and codes[201] + codes[503] == BURST, (codes, retryable)
    assert codes[201] >= BURST - 2, (codes, retryable)
    assert per_instance[0] > 0 and per_instance[1] > 0  # both instances served accepted requests

    access.revoke_key(raw.split("_")[1]).unwrap()
    db.dispose()
    for s in servers:
        with s.client(raw) as c:
            for _ in range(40):
                if c.post("/v1/conversations", json=turn()).status_code == 401:
                    break
                time.sleep(0.05)
            else:
                pytest.fail(f"{s.url} still accepts a revoked key")
