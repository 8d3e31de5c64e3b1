"""Real gateway servers for tests: ``python -m datamesh serve`` subprocesses on free ports.

Each server gets its own environment (``DATAMESH_*``), is waited on until ``/healthz`` answers,
and is terminated (by its pid) when the context exits; its log is kept for failure messages.
"""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import create_engine, text

from datamesh.core.result import Err
from datamesh.storage.cp import migrate
from datamesh.storage.cp.database import CpDatabase
from tests.conftest import PG_ADMIN_URL, service_missing

ROOT = Path(__file__).resolve().parents[1]
REDIS_URL = os.environ.get("DATAMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/7")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def client(self, key: str | None = None, **kwargs: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


@contextmanager
def serve(tmp: Path, **env: str) -> Iterator[Server]:
    """Start a gateway with ``env`` on top of a clean ``DATAMESH_*``-free environment."""
    port = free_port()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DATAMESH_")}
    clean.update({"PYTHONPATH": str(ROOT), "DATAMESH_DATA_DIR": str(tmp / "data")})
    clean.update(env)
    log = tmp / f"gateway-{port}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "datamesh", "serve", "--port", str(port)],
            cwd=tmp,
            env=clean,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 60
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"gateway exited with {process.returncode}:\n{server.output()}")
            try:
                if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway did not start:\n{server.output()}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def pg_schema() -> Iterator[str]:
    """A fresh, migrated PostgreSQL schema; the URL selects it through ``search_path``."""
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text("SELECT 1"))
    except Exception as exc:  # noqa: BLE001
        admin.dispose()
        service_missing("PostgreSQL on 127.0.0.1:5432 (database test)", exc)
    schema = f"gw_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    url = f"{PG_ADMIN_URL}?options=-csearch_path%3D{schema}"
    db = CpDatabase.open(url).unwrap()
    migrated = migrate.upgrade(db)
    db.dispose()
    if isinstance(migrated, Err):
        pytest.fail(f"migration failed: {migrated.error}")
    try:
        yield url
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def clean_redis() -> str:
    """Flush the test Redis database and return its URL."""
    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.flushdb()
    except redis.RedisError as exc:
        service_missing(f"Redis at {REDIS_URL}", exc)
    finally:
        client.close()
    return REDIS_URL


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def turn(entity: str | None = None, prompt: bytes = b"What is 2+2?", **extra: Any) -> dict[str, Any]:
    return {
        "entity_id": entity or str(uuid.uuid4()),
        "prompt": b64(prompt),
        "response": b64(b"4"),
        "geo_region": "eu-west",
        **extra,
    }
