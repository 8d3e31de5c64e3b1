"""The gateway over real HTTP: a uvicorn subprocess, the real PostgreSQL CP tier and Redis.

Given a running gateway and API keys in the CP tier, when clients call it with good and bad keys,
good and bad bodies, then each answer has the documented status, a JSON error naming the field,
a request id and trace context, and never a 500.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import create_engine, func, select

from datamesh.core.principal import Role
from datamesh.models.tables import Conversation
from datamesh.storage.cp.access import AccessControl
from datamesh.storage.cp.database import CpDatabase
from tests.gateway_support import Server, clean_redis, pg_schema, serve, turn

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
AUTH_TTL_S = 1.0


@pytest.fixture(scope="module")
def cp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with pg_schema() as url:
        yield url


@pytest.fixture(scope="module")
def access(cp: str) -> Iterator[AccessControl]:
    db = CpDatabase.open(cp).unwrap()
    yield AccessControl(db)
    db.dispose()


def key(access: AccessControl, tenant: str, name: str, role: Role, **kwargs: object) -> str:
    access.grant(tenant, name, role).unwrap()
    return access.issue_key(tenant, name, **kwargs).unwrap().raw  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(cp: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    redis_url = clean_redis()
    with serve(
        tmp_path_factory.mktemp("gw"),
        DATAMESH_CP_URL=cp,
        DATAMESH_RATE_LIMIT_REDIS_URL=redis_url,
        DATAMESH_GATEWAY_AUTH_CACHE_S=str(AUTH_TTL_S),
        DATAMESH_GATEWAY_MAX_BODY_BYTES="65536",
        DATAMESH_TRACE_SAMPLE_RATE="1",  # keep every success's log lines: the test reads them
    ) as s:
        yield s


def test_ingest_replay_and_read_back_with_trace_context(server: Server, access: AccessControl) -> None:
    writer = key(access, "acme", "alice", Role.WRITER)
    body = turn(prompt=b"Name a prime.\x00\xff", metadata={"model": "gpt-4"}, embedding=[0.5, 1, -2.25])
    parent = f"00-{TRACE_ID}-00f067aa0ba902b7-01"
    with server.client(writer) as c:
        first = c.post("/v1/conversations", json=body, headers={"traceparent": parent, "x-request-id": "req-1"})
        assert first.status_code == 201, first.text
        assert first.headers["x-request-id"] == "req-1"
        assert (
            first.headers["traceparent"].startswith(f"00-{TRACE_ID}-")
            and "00f067aa0ba902b7" not in first.headers["traceparent"]
        )
        assert {"ratelimit-limit", "ratelimit-remaining", "ratelimit-reset"} <= set(first.headers)
        again = c.post("/v1/conversations", json=body)
        assert again.status_code == 200 and again.json()["deduplicated"] is True
        assert again.json()["conversation_id"] == first.json()["conversation_id"]
        got = c.get(f"/v1/conversations/{first.json()['conversation_id']}")
    assert got.status_code == 200, got.text
    (t,) = got.json()["turns"]
    assert base64.b64decode(t["prompt"]) == b"Name a prime.\x00\xff" and t["embedding"] == [0.5, 1.0, -2.25]
    assert t["metadata"] == {"model": "gpt-4"} and got.json()["geo_region"] == "eu-west"
    assert len(got.headers["x-request-id"]) == 32  # made up when the client sends none
    assert '"request_id":"req-1"' in server.output() and f'"trace_id":"{TRACE_ID}"' in server.output()


def test_batch_answers_per_item_and_a_bad_item_does_not_fail_the_others(server: Server, access: AccessControl) -> None:
    writer = key(access, "acme", "batcher", Role.WRITER)
    items = [
        turn(),
        turn(prompt=b"x") | {"prompt": "not base64!"},
        turn() | {"geo_region": "mars-north"},
        turn() | {"embedding": "nope"},
        turn() | {"prompt": ""},
        turn(),
    ]
    with server.client(writer) as c:
        out = c.post("/v1/conversations/batch", json={"items": items})
    assert out.status_code == 200, out.text
    result = out.json()
    assert [i["status"] for i in result["items"]] == [201, 422, 422, 422, 422, 201]
    assert [i["error"]["field"] for i in result["items"][1:5]] == [
        "items.1.prompt",
        "items.2.geo_region",
        "items.3.embedding",
        "items.4.prompt",
    ]
    assert result["accepted"] == 2 and result["rejected"] == 4


def test_authentication_and_authorization(server: Server, access: AccessControl) -> None:
    writer = key(access, "acme", "w2", Role.WRITER)
    reader = key(access, "acme", "r1", Role.READER)
    outsider = key(access, "umbrella", "eve", Role.ADMIN)
    expired = key(access, "acme", "old", Role.ADMIN, expires_in=timedelta(seconds=-1))
    with server.client(writer) as c:
        cid = c.post("/v1/conversations", json=turn()).json()["conversation_id"]
    cases = [
        (None, "POST", 401),
        ("Bearer dmk_0000000000000000_" + "A" * 43, "POST", 401),
        ("Basic Zm9vOmJhcg==", "POST", 401),
        (f"Bearer {expired}", "POST", 401),
        (f"Bearer {reader}", "POST", 403),
        (f"Bearer {reader}", "GET", 200),
        (f"Bearer {outsider}", "GET", 404),  # another tenant's conversation does not exist for eve
    ]
    with httpx.Client(base_url=server.url) as c:
        for header, method, status in cases:
            headers = {"Authorization": header} if header else {}
            if method == "POST":
                r = c.post("/v1/conversations", json=turn(), headers=headers)
            else:
                r = c.get(f"/v1/conversations/{cid}", headers=headers)
            assert r.status_code == status, (header, method, r.text)
            if status >= 400:
                assert r.json()["error"]["type"] and r.json()["request_id"] == r.headers["x-request-id"]
            if status == 401:
                assert r.headers["www-authenticate"] == "Bearer"


def test_a_revoked_key_stops_working_within_the_cache_ttl(server: Server, access: AccessControl) -> None:
    raw = key(access, "acme", "leaver", Role.WRITER)
    key_id = raw.split("_")[1]
    with server.client(raw) as c:
        assert c.post("/v1/conversations", json=turn()).status_code == 201
        access.revoke_key(key_id).unwrap()
        revoked_at = time.monotonic()
        while c.post("/v1/conversations", json=turn()).status_code != 401:
            assert time.monotonic() - revoked_at < AUTH_TTL_S + 1.0, "revoked key still accepted after the TTL"
            time.sleep(0.05)


@pytest.mark.parametrize(
    ("content", "headers", "status", "field"),
    [
        (b'{"entity_id": ', {}, 400, "body"),
        (b"", {}, 400, "body"),
        (b"\xff\xfe", {}, 400, "body"),
        (b"[1, 2]", {}, 422, "body"),
        (b'{"entity_id": 7, "prompt": "eA==", "geo_region": "eu-west"}', {}, 422, "entity_id"),
        (b'{"entity_id": "%s", "prompt": 12, "geo_region": "eu-west"}', {}, 422, "prompt"),
        (b'{"entity_id": "%s", "prompt": "%%%%", "geo_region": "eu-west"}', {}, 422, "prompt"),
        (b'{"entity_id": "%s", "prompt": "eA==", "geo_region": "atlantis"}', {}, 422, "geo_region"),
        (b'{"entity_id": "%s", "prompt": "eA==", "geo_region": "eu-west", "colour": 1}', {}, 422, "colour"),
        (b'{"entity_id": "%s", "prompt": "eA==", "geo_region": "eu-west", "embedding": [NaN]}', {}, 422, "embedding.0"),
        (
            b'{"entity_id": "%s", "prompt": "eA==", "geo_region": "eu-west", "embedding": [1e39]}',
            {},
            422,
            "embedding.0",
        ),
        (b'{"entity_id": "%s", "prompt": "eA==", "geo_region": "eu-west", "conversation_id": "x"}', {}, 422, None),
        (b"[" * 50_000, {}, 400, "body"),
        (b"x" * 70_000, {}, 413, "body"),
    ],
    ids=[
        "truncated-json",
        "empty",
        "not-utf8",
        "not-an-object",
        "entity-not-a-string",
        "prompt-not-a-string",
        "bad-base64",
        "unknown-region",
        "unknown-field",
        "nan-embedding",
        "embedding-beyond-float32",
        "bad-conversation-id",
        "too-deep",
        "over-the-limit",
    ],
)
def test_bad_input_is_a_4xx_naming_the_field(
    server: Server, access: AccessControl, content: bytes, headers: dict[str, str], status: int, field: str | None
) -> None:
    writer = key(access, "acme", "fuzzer", Role.WRITER)
    if b"%s" in content:
        content = content % str(uuid.uuid4()).encode()
    with server.client(writer) as c:
        r = c.post("/v1/conversations", content=content, headers={"content-type": "application/json", **headers})
    assert r.status_code == status, r.text
    assert field is None or r.json()["error"]["field"] == field
    assert r.json()["request_id"] == r.headers["x-request-id"]


def test_a_chunked_body_over_the_limit_is_413(server: Server, access: AccessControl) -> None:
    writer = key(access, "acme", "streamer", Role.WRITER)

    def chunks() -> Iterator[bytes]:
        for _ in range(20):
            yield b" " * 8192

    with server.client(writer) as c:
        r = c.post("/v1/conversations/batch", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"


def test_unknown_conversation_and_bad_id(server: Server, access: AccessControl) -> None:
    reader = key(access, "acme", "r2", Role.READER)
    with server.client(reader) as c:
        assert c.get(f"/v1/conversations/{uuid.uuid4()}").status_code == 404
        bad = c.get("/v1/conversations/not-a-uuid")
        assert bad.status_code == 422 and bad.json()["error"]["field"] == "conversation_id"
        assert c.get("/v1/nowhere").status_code == 404


def test_operational_endpoints(server: Server) -> None:
    with server.client() as c:
        assert c.get("/healthz").json() == {"status": "ok", "checks": {}}
        ready = c.get("/readyz")
        assert ready.status_code == 200 and ready.json()["checks"] == {"cp": "ok", "redis": "ok"}
        metrics = c.get("/metrics")
        spec = c.get("/openapi.json").json()
    assert metrics.status_code == 200 and "datamesh_http_requests_total" in metrics.text
    assert 'route="/v1/conversations"' in metrics.text and "datamesh_ingest_items_total" in metrics.text
    assert {"/v1/conversations", "/v1/conversations/batch", "/v1/conversations/{conversation_id}"} <= set(spec["paths"])


# ---- servers with their own settings -------------------------------------------------------------


def test_rate_limits_per_key_and_per_tenant(cp: str, access: AccessControl, tmp_path: Path) -> None:
    a = key(access, "ratelimited", "a", Role.WRITER)
    b = key(access, "ratelimited", "b", Role.WRITER)
    env = {
        "DATAMESH_CP_URL": cp,
        "DATAMESH_RATE_LIMIT_REDIS_URL": clean_redis(),
        "DATAMESH_RATE_LIMIT_KEY_BURST": "3",
        "DATAMESH_RATE_LIMIT_KEY_RATE": "0.01",
        "DATAMESH_RATE_LIMIT_TENANT_BURST": "5",
        "DATAMESH_RATE_LIMIT_TENANT_RATE": "0.01",
    }
    with serve(tmp_path, **env) as s, s.client(a) as ca, s.client(b) as cb:
        assert [ca.post("/v1/conversations", json=turn()).status_code for _ in range(3)] == [201] * 3
        limited = ca.post("/v1/conversations", json=turn())
        assert limited.status_code == 429 and "key" in limited.json()["error"]["message"]
        assert int(limited.headers["retry-after"]) >= 1 and limited.headers["ratelimit-remaining"] == "0"
        assert [cb.post("/v1/conversations", json=turn()).status_code for _ in range(2)] == [201] * 2
        by_tenant = cb.post("/v1/conversations", json=turn())
        assert by_tenant.status_code == 429 and "tenant" in by_tenant.json()["error"]["message"]
        batch = cb.post("/v1/conversations/batch", json={"items": [turn(), turn()]})
        assert batch.status_code == 429
        assert 'datamesh_rate_limited_total{scope="tenant"}' in s.client().get("/metrics").text


@pytest.mark.parametrize(("mode", "status"), [("closed", 503), ("open", 201)])
def test_redis_down_fails_closed_or_open_by_configuration(
    cp: str, access: AccessControl, tmp_path: Path, mode: str, status: int
) -> None:
    writer = key(access, "acme", f"nored-{mode}", Role.WRITER)
    env = {
        "DATAMESH_CP_URL": cp,
        "DATAMESH_RATE_LIMIT_REDIS_URL": "redis://127.0.0.1:1/0",  # nothing listens there
        "DATAMESH_RATE_LIMIT_FAILURE": mode,
    }
    with serve(tmp_path, **env) as s, s.client(writer) as c:
        r = c.post("/v1/conversations", json=turn())
        assert r.status_code == status, r.text
        if mode == "closed":
            assert r.headers["retry-after"] == "1" and r.json()["error"]["type"] == "rate_limiter_unavailable"
        assert c.get("/readyz").status_code == (503 if mode == "closed" else 200)
        assert s.process.poll() is None
    if mode == "closed":  # a server error is always in the access log (successes are sampled)
        logged = [json.loads(line) for line in s.output().splitlines() if line.startswith("{")]
        assert any(
            rec["logger"] == "datamesh.gateway.access"
            and rec["level"] == "WARNING"
            and "POST /v1/conversations 503" in rec["message"]
            for rec in logged
        ), s.output()[-2000:]


def test_pipeline_backpressure_is_503_with_retry_after_and_nothing_unpersisted_is_accepted(
    cp: str, access: AccessControl, tmp_path: Path
) -> None:
    writer = key(access, "pressure", "w", Role.WRITER)
    env = {
        "DATAMESH_CP_URL": cp,
        "DATAMESH_RATE_LIMIT_REDIS_URL": "off",
        "DATAMESH_INGEST_RATE": "0.5",
        "DATAMESH_INGEST_BURST": "2",
    }
    with serve(tmp_path, **env) as s, s.client(writer) as c:
        answers = [c.post("/v1/conversations", json=turn()) for _ in range(5)]
        batch = c.post("/v1/conversations/batch", json={"items": [turn(), turn(), turn()]})
    codes = [a.status_code for a in answers]
    assert codes[:2] == [201, 201] and set(codes[2:]) == {503}, codes
    assert all(int(a.headers["retry-after"]) >= 1 for a in answers[2:])
    assert answers[2].json()["error"]["type"] == "backpressure"
    assert batch.status_code == 503
    # and each refusal's cause is logged, not only its status
    causes = [line for line in s.output().splitlines() if "answering 503 backpressure" in line]
    assert len(causes) == 4 and all('"level":"WARNING"' in line for line in causes), s.output()[-2000:]
    engine = create_engine(cp)
    with engine.connect() as conn:
        stored = conn.execute(
            select(func.count()).select_from(Conversation).where(Conversation.tenant == "pressure")
        ).scalar_one()
    engine.dispose()
    assert stored == 2  # exactly the accepted ones
