"""Faults: the S3 server goes away mid-run; nothing acknowledged is lost, and a lasting failure is a clear Err.

These tests use their own moto_server.  The server is really stopped (SIGTERM, the process exits)
and started again on the same port: moto keeps objects in memory only, so that test runs moto under
``moto_persistent.py``, which writes its objects to disk when it stops and loads them when it
starts, as an S3 server that keeps its data does.  Two more outages keep the process alive:
cutting its port (a proxy that closes every connection and refuses new ones: connection refused /
reset) and freezing the process (SIGSTOP / SIGCONT: requests time out).  Throttling and
server errors come from an HTTP proxy that answers some requests itself with S3's error codes.  A
permanent failure kills the server for good.
"""

from __future__ import annotations

import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

from datamesh.core.errors import StorageError
from datamesh.core.result import Err, Ok
from datamesh.core.retry import RetryPolicy
from datamesh.core.types import ContentHash
from datamesh.storage.objects import s3 as s3_module
from datamesh.storage.objects.base import ObjectStore
from datamesh.storage.objects.s3 import S3ObjectStore, _classify, make_client

from .conftest import TEST_PART_BYTES, MotoServer, free_port, s3_settings, unavailable, wait_listening

PATIENT_RETRY = RetryPolicy(attempts=30, base_s=0.05, cap_s=0.4)
MiB = 1 << 20


class PortCut:
    """A TCP proxy in front of the server; ``cut()`` drops every connection and refuses new ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._listener: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def restore(self) -> None:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
            for conn in self._conns:
                with _quiet():
                    conn.shutdown(socket.SHUT_RDWR)
                conn.close()
            self._conns.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            threading.Thread(target=_pipe, args=(client, upstream), daemon=True).start()
            threading.Thread(target=_pipe, args=(upstream, client), daemon=True).start()


class _quiet:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return True


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    with _quiet():
        while data := source.recv(1 << 16):
            sink.sendall(data)
    with _quiet():
        sink.shutdown(socket.SHUT_WR)


@pytest.fixture(scope="module")
def own_moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(free_port(), tmp_path_factory.mktemp("moto-faults") / "moto.log")
    if not server.start():
        server.stop()
        unavailable("moto_server is not installed or did not start")
    yield server
    server.stop()


def fresh_bucket(endpoint: str) -> str:
    name = f"f-{os.urandom(8).hex()}"
    make_client(s3_settings(endpoint)).create_bucket(Bucket=name)
    return name


def payloads(n: int) -> list[bytes]:
    """Mostly small blobs, every fifth one a multipart stream."""
    return [os.urandom(TEST_PART_BYTES + 4096) if i % 5 == 4 else os.urandom(32 * 1024) for i in range(n)]


def ingest_through_outage(
    store: ObjectStore[Any],
    blobs: list[bytes],
    outage: Callable[[], None],
    resume: Callable[[], None],
    hold_s: float = 1.5,
) -> list[ContentHash]:
    """Put every blob while the server goes away for a while mid-run; return the acknowledged keys."""
    acknowledged: list[ContentHash] = []
    for i, blob in enumerate(blobs):
        if i == len(blobs) // 3:
            outage()
            threading.Timer(hold_s, resume).start()
        chunks = [blob[j : j + (1 << 20)] for j in range(0, len(blob), 1 << 20)]
        result = store.put_stream(iter(chunks)) if len(blob) > TEST_PART_BYTES else store.put(blob)
        if isinstance(result, Ok):
            acknowledged.append(result.value.content_hash)
    return acknowledged


@pytest.fixture
def transient_failures(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every failure the S3 store judged transient (and therefore retried)."""
    seen: list[str] = []

    def counting(exc: BaseException) -> bool:
        retryable = _classify(exc)[0]
        if retryable:
            seen.append(type(exc).__name__)
        return retryable

    monkeypatch.setattr(s3_module, "_is_retryable", counting)
    return seen


def test_port_cut_mid_run_loses_no_acknowledged_blob(own_moto: MotoServer, transient_failures: list[str]) -> None:
    bucket = fresh_bucket(own_moto.endpoint)
    cut = PortCut(own_moto.port)
    cut.restore()
    store = S3ObjectStore.from_settings(s3_settings(cut.endpoint, retry=PATIENT_RETRY), bucket, "x")
    blobs = payloads(30)
    acknowledged = ingest_through_outage(store, blobs, cut.cut, cut.restore)

    assert transient_failures, "the outage should have been seen and retried"
    assert len(acknowledged) == len(blobs)  # the outage was shorter than the retry budget
    for key in acknowledged:
        assert isinstance(store.verify(key), Ok)
    assert isinstance(store.sweep_staging(older_than=datetime(2999, 1, 1, tzinfo=UTC)), Ok)
    cut.cut()
    store.close()


class PersistentMoto:
    """moto under ``moto_persistent.py``: ``stop`` ends the process, ``start`` runs a new one on the
    same port that loads what the last one saved."""

    def __init__(self, state: Path) -> None:
        self.port, self.state, self.log = free_port(), state, state.with_suffix(".log")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, str(Path(__file__).with_name("moto_persistent.py")), str(self.port), str(self.state)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        if not wait_listening(self.port, timeout_s=60.0):
            self.stop()
            unavailable("moto (persistent) did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=60)
            self.process = None

    def lines(self, marker: str) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if marker in line]


def test_server_stopped_and_restarted_mid_run_loses_no_acknowledged_blob(
    tmp_path: Path, transient_failures: list[str]
) -> None:
    # Given an S3 server that keeps its objects across a stop and a start, and a store that is
    # patient for longer than the server takes to come back
    server = PersistentMoto(tmp_path / "s3-state")
    server.start()
    try:
        bucket = fresh_bucket(server.endpoint)
        store = S3ObjectStore.from_settings(s3_settings(server.endpoint, retry=PATIENT_RETRY), bucket, "x")
        # small single PUTs, one-part PUTs, and multipart streams
        sizes = {0: 32 * 1024, 1: 32 * 1024, 2: TEST_PART_BYTES, 3: 2 * TEST_PART_BYTES + 4096}
        blobs = [os.urandom(sizes[i % 4]) for i in range(36)]
        stop_at = len(blobs) // 3 - len(blobs) // 3 % 4 + 3  # a stream
        restarting = threading.Thread(target=lambda: (time.sleep(1.0), server.start()))

        def chunks(blob: bytes, stop_after: int | None) -> Iterator[bytes]:
            """The stream's chunks; the server is stopped (all it has saved) once ``stop_after`` were
            taken, while the upload is unfinished, and started again a second later."""
            for n, start in enumerate(range(0, len(blob), MiB)):
                if n == stop_after:
                    server.stop()
                    restarting.start()
                yield blob[start : start + MiB]

        # When the server is stopped a third of the way in, in the middle of a multipart upload,
        # and started again
        acknowledged: list[ContentHash] = []
        for i, blob in enumerate(blobs):
            if len(blob) > TEST_PART_BYTES:
                parts_before_stop = TEST_PART_BYTES // MiB + 2 if i == stop_at else None
                stored = store.put_stream(chunks(blob, parts_before_stop))
            else:
                stored = store.put(blob)
            acknowledged.append(stored.unwrap().content_hash)
        restarting.join()
        # Then the outage was seen and retried, and every put was acknowledged in the end
        assert transient_failures, "the stop should have been seen and retried"
        assert acknowledged == [ContentHash.of(b) for b in blobs]
        # And the server really restarted, from what it had saved
        saved = [int(line.split()[2]) for line in server.lines("stopped with")]
        loaded = [int(line.split()[4]) for line in server.lines("serving on")]
        assert len(loaded) == 2 and loaded[1] == saved[0] > 0
        # with the upload that was under way, which went on where it stopped
        assert server.lines("serving on")[1].endswith(" 1 unfinished uploads")
        # And every acknowledged blob, before the stop and after, is on the restarted server, whole
        for key in acknowledged:
            assert isinstance(store.verify(key), Ok), key
        listed = store.list().unwrap()
        assert sorted(k.hex for k in listed) == sorted({k.hex for k in acknowledged})
        store.close()
    finally:
        server.stop()


def freeze(pid: int) -> None:
    """SIGSTOP takes effect asynchronously: wait until the kernel reports the process stopped."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        with open(f"/proc/{pid}/status") as status:
            if any(line.startswith("State:") and "T" in line.split()[1] for line in status):
                return
        time.sleep(0.01)


def test_frozen_server_mid_run_loses_no_acknowledged_blob(own_moto: MotoServer, transient_failures: list[str]) -> None:
    assert own_moto.process is not None
    pid = own_moto.process.pid
    bucket = fresh_bucket(own_moto.endpoint)
    settings = s3_settings(own_moto.endpoint, retry=PATIENT_RETRY, read_timeout_s=0.5, connect_timeout_s=0.5)
    store = S3ObjectStore.from_settings(settings, bucket, "x")
    blobs = payloads(20)
    try:
        acknowledged = ingest_through_outage(
            # held longer than the wait for "100 Continue" plus the read timeout, so a timeout must be seen
            store,
            blobs,
            lambda: freeze(pid),
            lambda: os.kill(pid, signal.SIGCONT),
            hold_s=4.0,
        )
    finally:
        os.kill(pid, signal.SIGCONT)
    assert transient_failures, "the freeze should have been seen and retried"
    assert len(acknowledged) == len(blobs)
    for key in acknowledged:
        assert isinstance(store.verify(key), Ok)
    store.close()


class ErrorInjector:
    """An HTTP proxy in front of the server that answers every ``every``-th request itself with an
    S3 error, in turn ``503 SlowDown``, ``500 InternalError`` and ``503 ServiceUnavailable``, and
    forwards the others."""

    ERRORS = ((503, "SlowDown"), (500, "InternalError"), (503, "ServiceUnavailable"))

    def __init__(self, target_port: int, every: int = 3) -> None:
        self.every = every
        self.served: list[str] = []
        self._count = 0
        self._lock = threading.Lock()
        injector = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length) if length else b""
                with injector._lock:
                    injector._count += 1
                    error = injector._count % injector.every == 0
                    status, code = injector.ERRORS[len(injector.served) % len(injector.ERRORS)]
                    if error:
                        injector.served.append(code)
                if error:
                    payload = f"<Error><Code>{code}</Code><Message>injected</Message></Error>".encode()
                    self._answer(status, [("Content-Type", "application/xml")], payload)
                    return
                upstream = http.client.HTTPConnection("127.0.0.1", target_port, timeout=30)
                try:
                    upstream.request(self.command, self.path, body=body, headers=dict(self.headers.items()))
                    answer = upstream.getresponse()
                    hop = {"transfer-encoding", "connection", "content-length"}
                    kept = [h for h in answer.getheaders() if h[0].lower() not in hop]
                    self._answer(answer.status, kept, answer.read())
                finally:
                    upstream.close()

            def _answer(self, status: int, headers: list[tuple[str, str]], payload: bytes) -> None:
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def test_5xx_and_throttling_answers_are_retried_and_lose_nothing(
    own_moto: MotoServer, transient_failures: list[str]
) -> None:
    # Given a server that answers every third request with a throttling or server error
    bucket = fresh_bucket(own_moto.endpoint)
    injector = ErrorInjector(own_moto.port)
    store = S3ObjectStore.from_settings(s3_settings(injector.endpoint, retry=PATIENT_RETRY), bucket, "x")
    try:
        # When blobs are put (one request each, or multipart streams) and read back
        blobs = payloads(15)
        acknowledged = ingest_through_outage(store, blobs, lambda: None, lambda: None, hold_s=0.0)
        read = [store.get(key) for key in acknowledged]
    finally:
        store.close()
        injector.close()
    # Then every kind of answer was met and retried, and every blob was stored and reads back whole
    assert set(injector.served) == {"SlowDown", "InternalError", "ServiceUnavailable"}
    assert transient_failures.count("ClientError") == len(injector.served)  # each one retried
    assert len(acknowledged) == len(blobs) and read == [Ok(blob) for blob in blobs]
    direct = S3ObjectStore.from_settings(s3_settings(own_moto.endpoint), bucket, "x")
    assert sorted(direct.list().unwrap()) == sorted(ContentHash.of(b) for b in blobs)
    direct.close()


def test_missing_bucket_is_a_permanent_clear_error(own_moto: MotoServer, transient_failures: list[str]) -> None:
    store = S3ObjectStore.from_settings(s3_settings(own_moto.endpoint), "no-such-bucket-here", "x")
    result = store.put(b"anything")
    assert transient_failures == []  # judged permanent: not retried
    assert isinstance(result, Err) and isinstance(result.error, StorageError)
    assert not result.error.retryable and "NoSuchBucket" in result.error.message
    store.close()


def test_server_gone_for_good_is_a_retryable_err_after_bounded_retries(tmp_path: Path) -> None:
    server = MotoServer(free_port(), tmp_path / "moto.log")
    if not server.start():
        unavailable("moto_server did not start")
    bucket = fresh_bucket(server.endpoint)
    store = S3ObjectStore.from_settings(s3_settings(server.endpoint), bucket, "x")
    key = store.put(b"before the crash").unwrap().content_hash
    server.stop()

    for result in (store.put(b"after the crash"), store.get(key), store.exists(key), store.list()):
        assert isinstance(result, Err) and isinstance(result.error, StorageError)
        assert result.error.retryable and "connection failed" in result.error.message
    store.close()


def _client_error(status: int, code: str) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}},  # type: ignore[typeddict-item]
        "PutObject",
    )


@pytest.mark.parametrize(
    ("exc", "retryable"),
    [
        (_client_error(503, "SlowDown"), True),
        (_client_error(500, "InternalError"), True),
        (_client_error(502, "BadGateway"), True),
        (_client_error(400, "ThrottlingException"), True),
        (_client_error(429, "TooManyRequests"), True),
        (_client_error(400, "RequestTimeout"), True),
        (_client_error(403, "AccessDenied"), False),
        (_client_error(404, "NoSuchBucket"), False),
        (_client_error(400, "BadDigest"), False),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), True),
        (ConnectionRefusedError(111, "refused"), True),
        (NoCredentialsError(), False),
    ],
)
def test_failures_are_classified(exc: Exception, retryable: bool) -> None:
    assert _classify(exc)[0] is retryable
