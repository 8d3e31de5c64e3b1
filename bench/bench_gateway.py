"""Gateway throughput and latency over real HTTP, next to a trivial endpoint on the same server.

Starts ``python -m datamesh serve`` (CP on a temporary SQLite file unless ``--cp-url``; rate
limiting in Redis with limits high enough never to refuse, unless ``--no-redis``), issues an API
key, then drives, one after the other and for ``--seconds`` each with ``--concurrency`` open
connections (Python asyncio + httpx):

* ``GET /healthz``            the trivial endpoint: HTTP + ASGI + middleware, no auth, no storage
* ``POST /v1/conversations``  single-turn ingest (auth, rate limit, base64, pipeline saga)
* ``POST /v1/conversations/batch``  ``--batch`` turns a request

Payloads are real AlpacaEval prompts and responses from ../shared/data, each request unique (no
deduplication).  Prints requests/s, turns/s and p50/p99 latency per endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "alpaca_eval"
sys.path.insert(0, str(ROOT))

from datamesh.core.principal import Role  # noqa: E402
from datamesh.storage.cp import migrate  # noqa: E402
from datamesh.storage.cp.access import AccessControl  # noqa: E402
from datamesh.storage.cp.database import CpDatabase  # noqa: E402


def rows() -> list[dict[str, str]]:
    out: list[dict[str, str]] = []
    for path in sorted(DATA.glob("*.json")):
        out.extend(json.loads(path.read_text(encoding="utf-8")))
    return out


class Payloads:
    def __init__(self) -> None:
        self.rows = rows()
        self.i = 0

    def turn(self) -> dict[str, Any]:
        row = self.rows[self.i % len(self.rows)]
        self.i += 1
        # a unique prefix so that no request is a replay of another
        prompt = f"[{uuid.uuid4()}] {row['instruction']}".encode()
        return {
            "entity_id": str(uuid.uuid4()),
            "prompt": base64.b64encode(prompt).decode(),
            "response": base64.b64encode(row["output"].encode()).decode(),
            "geo_region": "eu-west",
        }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def drive(
    url: str,
    key: str,
    make: Callable[[], tuple[str, str, dict[str, Any] | None]],
    *,
    seconds: float,
    concurrency: int,
    expect: int,
) -> tuple[int, int, list[float]]:
    """Requests done, unexpected statuses, latencies (s)."""
    latencies: list[float] = []
    bad = [0]
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {key}"}, limits=limits, timeout=60
    ) as client:
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            while time.perf_counter() < deadline:
                method, path, body = make()
                started = time.perf_counter()
                r = await client.request(method, path, json=body)
                latencies.append(time.perf_counter() - started)
                if r.status_code != expect:
                    bad[0] += 1
                    if bad[0] <= 3:
                        print(f"  unexpected {r.status_code}: {r.text[:200]}", file=sys.stderr)

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies), bad[0], latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--cp-url", help="CP database (default: a temporary SQLite file)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/7")
    parser.add_argument("--no-redis", action="store_true", help="run without the rate limiter")
    args = parser.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench-gateway-"))
    cp_url = args.cp_url or f"sqlite:///{tmp / 'cp.sqlite3'}"
    db = CpDatabase.open(cp_url).unwrap()
    migrate.upgrade(db).unwrap()
    access = AccessControl(db)
    access.grant("bench", "loadgen", Role.WRITER).unwrap()
    key = access.issue_key("bench", "loadgen").unwrap().raw
    db.dispose()

    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMESH_")}
    env.update(
        {
            "PYTHONPATH": str(ROOT),
            "DATAMESH_DATA_DIR": str(tmp / "data"),
            "DATAMESH_CP_URL": cp_url,
            "DATAMESH_RATE_LIMIT_REDIS_URL": "off" if args.no_redis else args.redis_url,
            "DATAMESH_RATE_LIMIT_KEY_BURST": "1000000000",
            "DATAMESH_RATE_LIMIT_KEY_RATE": "1000000000",
            "DATAMESH_RATE_LIMIT_TENANT_BURST": "1000000000",
            "DATAMESH_RATE_LIMIT_TENANT_RATE": "1000000000",
        }
    )
    log = (tmp / "gateway.log").open("wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "datamesh", "serve", "--port", str(port), "--log-level", "warning"],
        env=env,
        cwd=tmp,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            print((tmp / "gateway.log").read_text())
            return 1
        payloads = Payloads()
        cases: list[tuple[str, int, int, Callable[[], tuple[str, str, dict[str, Any] | None]]]] = [
            ("GET /healthz (trivial)", 1, 200, lambda: ("GET", "/healthz", None)),
            ("POST /v1/conversations", 1, 201, lambda: ("POST", "/v1/conversations", payloads.turn())),
            (
                f"POST /v1/conversations/batch x{args.batch}",
                args.batch,
                200,
                lambda: ("POST", "/v1/conversations/batch", {"items": [payloads.turn() for _ in range(args.batch)]}),
            ),
        ]
        print(
            f"gateway bench: {os.cpu_count()} CPUs shared by server and load generator, "
            f"{args.concurrency} connections, {args.seconds:.0f}s per endpoint, "
            f"CP={'sqlite' if cp_url.startswith('sqlite') else 'postgresql'}, "
            f"rate limiter={'off' if args.no_redis else 'redis'}"
        )
        print(f"{'endpoint':34} {'requests':>9} {'req/s':>9} {'turns/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7}")
        for name, turns, expect, make in cases:
            started = time.perf_counter()
            done, bad, lat = asyncio.run(
                drive(url, key, make, seconds=args.seconds, concurrency=args.concurrency, expect=expect)
            )
            elapsed = time.perf_counter() - started
            rps = done / elapsed
            print(
                f"{name:34} {done:9d} {rps:9.0f} {rps * turns:9.0f} {pct(lat, 0.5):8.2f} {pct(lat, 0.99):8.2f} {bad:7d}"
            )
        print(f"(mean latency of the last run: {statistics.fmean(lat) * 1000:.2f} ms)")
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
