"""``/v1/search`` and erasure over real HTTP: a uvicorn subprocess, the real PostgreSQL and Redis."""

from __future__ import annotations

import base64
import time
import uuid
from collections.abc import Iterator

import httpx
import pytest

from datamesh.core.principal import Role
from datamesh.storage.cp.access import AccessControl
from datamesh.storage.cp.database import CpDatabase
from tests.gateway_support import Server, clean_redis, pg_schema, serve, turn
from tests.helpers import alpaca


@pytest.fixture(scope="module")
def access() -> Iterator[tuple[AccessControl, str]]:
    with pg_schema() as url:
        db = CpDatabase.open(url).unwrap()
        yield AccessControl(db), url
        db.dispose()


@pytest.fixture(scope="module")
def server(access: tuple[AccessControl, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with serve(
        tmp_path_factory.mktemp("gws"),
        DATAMESH_CP_URL=access[1],
        DATAMESH_RATE_LIMIT_REDIS_URL=clean_redis(),
        DATAMESH_INDEX_INTERVAL_S="0.05",
    ) as s:
        yield s


def key(access: AccessControl, tenant: str, name: str, role: Role) -> str:
    access.grant(tenant, name, role).unwrap()
    return access.issue_key(tenant, name).unwrap().raw


def search_until(c: httpx.Client, params: dict[str, str], want: int) -> list[dict[str, object]]:
    """Poll: the index is fed asynchronously after the commit."""
    hits: list[dict[str, object]] = []
    for _ in range(200):
        r = c.get("/v1/search", params=params)
        assert r.status_code == 200, r.text
        hits = r.json()["hits"]
        if len(hits) >= want:
            return hits
        time.sleep(0.05)
    return hits


def test_search_is_scoped_to_the_key_and_erasure_removes_hits(
    server: Server, access: tuple[AccessControl, str]
) -> None:
    ac = access[0]
    writer = key(ac, "acme", "w", Role.WRITER)
    reader = key(ac, "acme", "r", Role.READER)
    outsider = key(ac, "umbrella", "eve", Role.ADMIN)
    row = alpaca()[7]
    entity = str(uuid.uuid4())
    body = turn(entity, row["instruction"].encode(), response=base64.b64encode(row["output"].encode()).decode())
    with server.client(writer) as c:
        cid = c.post("/v1/conversations", json=body).json()["conversation_id"]
    words = " ".join(row["instruction"].split()[:6])
    # Given the turn is indexed, a reader of the tenant finds it by words
    with server.client(reader) as c:
        hits = search_until(c, {"text": words}, 1)
        assert [h["conversation_id"] for h in hits] == [cid] and hits[0]["turn_seq"] == 0
        assert c.get("/v1/search", params={"text": words, "region": "us-east"}).json()["hits"] == []
        assert c.get("/v1/search", params={"text": words, "entity_id": entity}).json()["hits"]
        posted = c.post("/v1/search", json={"text": words, "region": "eu-west", "since": "2000-01-01T00:00:00Z"})
        assert posted.status_code == 200 and [h["conversation_id"] for h in posted.json()["hits"]] == [cid]
        # a reader may not erase
        assert c.delete(f"/v1/entities/{entity}").status_code == 403
    # and another tenant sees nothing and cannot erase it
    with server.client(outsider) as c:
        assert c.get("/v1/search", params={"text": words}).json()["hits"] == []
        assert c.delete(f"/v1/entities/{entity}").status_code == 404
    # When the writer erases the entity
    with server.client(writer) as c:
        erased = c.delete(f"/v1/entities/{entity}")
        assert erased.status_code == 200 and erased.json()["conversations"] == [cid]
        # then it is gone for reads and for search, and erasing again finds nothing new
        assert c.get(f"/v1/conversations/{cid}").status_code == 404
        assert c.get("/v1/search", params={"text": words}).json()["hits"] == []
        assert c.delete(f"/v1/entities/{entity}").json()["conversations"] == []
        assert c.delete(f"/v1/conversations/{uuid.uuid4()}").status_code == 404


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("GET", {}, "text"),
        ("GET", {"text": "x", "limit": "0"}, "limit"),
        ("GET", {"text": "x", "region": "mars"}, "region"),
        ("GET", {"text": "x", "entity_id": "nope"}, "entity_id"),
        ("GET", {"text": "x", "since": "2026-01-01T00:00:00"}, "since"),
        ("POST", {"vector": [1.0, 2.0]}, "vector"),
        ("POST", {"text": "x", "until": "yesterday"}, "until"),
        ("POST", {"text": "x", "extra": 1}, "extra"),
        ("POST", {}, "text"),
    ],
)
def test_bad_search_arguments_are_422_naming_the_field(
    server: Server, access: tuple[AccessControl, str], method: str, params: dict[str, object], field: str
) -> None:
    reader = key(access[0], "acme", f"r-{uuid.uuid4().hex[:8]}", Role.READER)
    with server.client(reader) as c:
        r = c.get("/v1/search", params=params) if method == "GET" else c.post("/v1/search", json=params)  # type: ignore[arg-type]
        assert r.status_code == 422, r.text
        assert r.json()["error"]["field"] == field
