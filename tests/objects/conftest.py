"""Fixtures of the object store tests: a real S3-compatible server (moto) on loopback, clean stores.

``moto_server`` runs as a subprocess (session-scoped) so the tests talk HTTP to it and so its memory
is not counted in this process.  Locally a missing server skips the S3 tests; under ``CI=true`` it fails.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from datamesh.core.retry import RetryPolicy
from datamesh.storage.objects.base import ObjectStore
from datamesh.storage.objects.config import MIN_S3_PART_BYTES, S3Settings
from datamesh.storage.objects.filesystem import FilesystemObjectStore

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")  # as tests/conftest.py reads it
CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing"}
REGION = "us-east-1"
#: Small parts so the multipart paths run on payloads of a few MiB.
TEST_PART_BYTES = MIN_S3_PART_BYTES
FAST_RETRY = RetryPolicy(attempts=4, base_s=0.02, cap_s=0.2)


def unavailable(reason: str) -> None:
    """Skip locally, fail under CI=true (a missing service is a broken CI, not a skip)."""
    if CI:
        pytest.fail(f"required service unavailable under CI=true: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_listening(port: int, timeout_s: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return True
        except OSError:
            time.sleep(0.05)
    return False


@dataclass
class MotoServer:
    """A moto_server subprocess; ``stop``/``start`` are for the fault tests."""

    port: int
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> bool:
        binary = shutil.which("moto_server")
        if binary is None:
            return False
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [binary, "-H", "127.0.0.1", "-p", str(self.port)], stdout=log, stderr=subprocess.STDOUT
            )
        return wait_listening(self.port)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(free_port(), tmp_path_factory.mktemp("moto") / "moto.log")
    if not server.start():
        server.stop()
        unavailable("moto_server is not installed or did not start (pip install 'moto[server]')")
    yield server
    server.stop()


def s3_settings(endpoint: str, **changes: Any) -> S3Settings:
    values: dict[str, Any] = {
        "endpoint_url": endpoint,
        "region_name": REGION,
        "part_bytes": TEST_PART_BYTES,
        # bytes above one part go multipart (concurrent parts), as larger payloads do by default
        "single_put_max_bytes": TEST_PART_BYTES,
        "retry": FAST_RETRY,
        **CREDENTIALS,
    }
    values.update(changes)
    return S3Settings(**values)


@pytest.fixture(scope="session")
def s3_client(moto: MotoServer) -> Any:
    from datamesh.storage.objects.s3 import make_client

    return make_client(s3_settings(moto.endpoint))


@pytest.fixture
def bucket(s3_client: Any) -> str:
    """A fresh bucket per test: clean state without restarting the server."""
    name = f"t-{uuid.uuid4().hex[:20]}"
    s3_client.create_bucket(Bucket=name)
    return name


def make_s3_store(moto: MotoServer, bucket: str, prefix: str = "objects", **changes: Any) -> ObjectStore[Any]:
    from datamesh.storage.objects.s3 import S3ObjectStore

    return S3ObjectStore.from_settings(s3_settings(moto.endpoint, **changes), bucket, prefix)


@pytest.fixture(params=["fs", "s3"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(backend: str, request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ObjectStore[Any]]:
    """The store under test, once per backend (the contract suite runs against each)."""
    made: ObjectStore[Any]
    if backend == "fs":
        made = FilesystemObjectStore(tmp_path / "objects", fsync=False)
    else:
        moto = request.getfixturevalue("moto")
        made = make_s3_store(moto, request.getfixturevalue("bucket"))
    yield made
    made.close()


def corrupt(store: ObjectStore[Any], key: str, s3_client: Any | None = None) -> None:
    """Overwrite object ``key`` with other bytes behind the store's back."""
    from datamesh.storage.objects.s3 import S3ObjectStore

    if isinstance(store, FilesystemObjectStore):
        path = store.path_of(key)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.chmod(0o644)
        path.write_bytes(bytes(data))
    elif isinstance(store, S3ObjectStore):
        client = s3_client or store.client
        client.put_object(Bucket=store.bucket, Key=store.key_of(key), Body=b"rotten bytes")
    else:  # pragma: no cover
        raise TypeError(type(store))
