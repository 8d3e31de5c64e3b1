"""moto's S3 server, keeping its finished objects on disk across a stop and a start.

    python -m tests.objects.moto_persistent PORT STATE_DIR

moto keeps objects in memory only, so a plain restart would wipe them.  This server loads every
object found in ``STATE_DIR`` before it listens, and on SIGTERM stops listening, lets the requests
already being served finish (their answers may have acknowledged a put), writes every object to
``STATE_DIR`` and exits: the stop and start of a server that keeps its data.  Unfinished multipart
uploads are kept too, under their upload ids, with the parts uploaded so far.
"""

from __future__ import annotations

import base64
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from moto.core import DEFAULT_ACCOUNT_ID
from moto.s3.models import S3Backend, s3_backends
from moto.server import DomainDispatcherApplication, create_backend_app
from moto.utilities.utils import CaseInsensitiveDict
from werkzeug.serving import make_server

REGION = "us-east-1"
UPLOADS = ".uploads"  # bucket names never start with a dot
CLOSE = [("Connection", "close")]
SHUTTING_DOWN = b"<Error><Code>ServiceUnavailable</Code><Message>shutting down</Message></Error>"


class InFlight:
    """WSGI middleware counting the requests being served; once ``closed``, it refuses new ones with
    503 (a kept-alive connection can still bring a request after the listener has stopped)."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app
        self.count = 0
        self.closed = False
        self.lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> list[bytes]:
        with self.lock:
            if self.closed:
                start_response("503 Service Unavailable", [("Content-Type", "application/xml"), *CLOSE])
                return [SHUTTING_DOWN]
            self.count += 1
        try:
            return list(self.app(environ, start_response))  # the whole answer, before the count drops
        finally:
            with self.lock:
                self.count -= 1

    def drain(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.count and time.monotonic() < deadline:
            time.sleep(0.01)


def _backend() -> S3Backend:
    return s3_backends[DEFAULT_ACCOUNT_ID]["global"]


def _name(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def load(state: Path) -> int:
    backend, loaded = _backend(), 0
    for bucket in sorted(p for p in state.iterdir() if p.is_dir() and p.name != UPLOADS):
        backend.create_bucket(bucket.name, REGION)
        for item in bucket.iterdir():
            backend.put_object(bucket.name, base64.urlsafe_b64decode(item.name).decode(), item.read_bytes())
            loaded += 1
    for upload in sorted((state / UPLOADS).glob("*/*")):
        _load_upload(backend, upload.parent.name, upload)
    return loaded


def unfinished(state: Path) -> int:
    return len(list((state / UPLOADS).glob("*/*")))


def _load_upload(backend: S3Backend, bucket: str, folder: Path) -> None:
    """Recreate an unfinished multipart upload under its old id, with its parts."""
    key = (folder / "key").read_text()
    made = backend.create_multipart_upload(bucket, key, CaseInsensitiveDict(), "STANDARD", {}, None, "", "")
    uploads = backend.get_bucket(bucket).multiparts
    del uploads[made.id]
    made.id = folder.name
    uploads[made.id] = made
    for part in sorted(folder.glob("part-*"), key=lambda p: int(p.name[5:])):
        backend.upload_part(bucket, made.id, int(part.name[5:]), part.read_bytes())


def save(state: Path) -> int:
    fresh = state.with_name(state.name + ".new")
    shutil.rmtree(fresh, ignore_errors=True)
    fresh.mkdir(parents=True)
    saved = 0
    for name, bucket in list(_backend().buckets.items()):
        folder = fresh / name
        folder.mkdir()
        for key in list(bucket.keys.values()):
            (folder / _name(key.name)).write_bytes(key.value)
            saved += 1
        for upload_id, upload in list(bucket.multiparts.items()):
            kept = fresh / UPLOADS / name / upload_id
            kept.mkdir(parents=True)
            (kept / "key").write_text(upload.key_name)
            for number, part in list(upload.parts.items()):
                (kept / f"part-{number}").write_bytes(part.value)
    shutil.rmtree(state, ignore_errors=True)
    fresh.rename(state)
    return saved


def main(port: int, state: Path) -> None:
    state.mkdir(parents=True, exist_ok=True)
    loaded = load(state)
    app = InFlight(DomainDispatcherApplication(create_backend_app))
    server = make_server("127.0.0.1", port, app, threaded=True)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    print(f"serving on {port} with {loaded} objects loaded, {unfinished(state)} unfinished uploads", flush=True)
    stopping.wait()
    with app.lock:
        app.closed = True  # no new request from here on
    server.shutdown()  # nor new connections
    server.server_close()
    app.drain()
    print(f"stopped with {save(state)} objects saved", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), Path(sys.argv[2]))
