"""Flower started by ``python -m datamesh flower`` sees the worker pools and the saga tasks, and no
read answered by a worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from datamesh.core.config import DataMeshConfig
from datamesh.pipeline.ingestion import IngestionPipeline
from tests.celery.conftest import ROOT, Workers, env_of
from tests.celery.test_broker_restart import free_port
from tests.helpers import real_requests


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


async def test_flower_shows_pools_and_saga_tasks(
    workers: Workers, celery_config: DataMeshConfig, tmp_path: Path
) -> None:
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DATAMESH_")}, **env_of(celery_config)}
    env["PYTHONPATH"] = str(ROOT)
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115
    flower = subprocess.Popen(
        [sys.executable, "-m", "datamesh", "flower", "--port", str(port), "--unauthenticated-api"],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                get_json(f"{base}/api/workers")
                break
            except OSError:
                assert flower.poll() is None, (tmp_path / "flower.log").read_text()
                assert time.monotonic() < deadline, "flower did not start"
                time.sleep(0.3)
        # Given an AP pool and a CP pool,
        workers.start("--role", "ap", "--region", "eu-west", "--shards", "0-3", "--name", "ap-eu")
        workers.start("--role", "cp", "--name", "cp-pool")
        workers.start("--role", "blobs", "--name", "blobs-pool")
        workers.wait_ready(3)
        # when a saga runs through them,
        async with (await IngestionPipeline.create(celery_config)).unwrap() as p:
            assert all(r.is_ok() for r in (await p.ingest_many(real_requests(12))).unwrap())
        # then Flower lists the pools, with their queues, and the saga's tasks.
        deadline = time.monotonic() + 30
        while True:
            pools = get_json(f"{base}/api/workers?refresh=1")
            tasks = get_json(f"{base}/api/tasks")
            names = {t.get("name") for t in tasks.values()}
            if len(pools) >= 3 and {"datamesh.write_ap", "datamesh.commit_cp"} <= names:
                break
            assert time.monotonic() < deadline, (pools.keys(), names)
            time.sleep(0.5)
        assert any(n.startswith("ap-eu.") for n in pools) and any(n.startswith("cp-pool.") for n in pools)
        ap_queues = {
            q["name"] for n, info in pools.items() if n.startswith("ap-eu.") for q in info.get("active_queues", [])
        }
        assert ap_queues == {f"{kind}.eu-west.{n}" for kind in ("ap", "ap-read") for n in range(4)}
        assert all(t["state"] == "SUCCESS" for t in tasks.values() if t.get("name") == "datamesh.commit_cp")
        # And a read routed to a shard's owner sends no monitoring event (its answer is content): once
        # Flower has seen a write_ap task the same pool ran after the read, it still knows no read_ap.
        writes_before = sum(1 for t in tasks.values() if t.get("name") == "datamesh.write_ap")
        reader = celery_config.with_changes(ap_reads="workers")
        async with (await IngestionPipeline.create(reader)).unwrap() as p:
            requests = real_requests(2)
            first = (await p.ingest(requests[0])).unwrap()
            assert (await p.get(first.conversation_id)).unwrap().turns[0].response == requests[0].response
            assert (await p.ingest(requests[1])).is_ok()
        deadline = time.monotonic() + 30
        while True:
            names_seen = [t.get("name") for t in get_json(f"{base}/api/tasks").values()]
            if names_seen.count("datamesh.write_ap") >= writes_before + 2:
                break
            assert time.monotonic() < deadline, names_seen
            time.sleep(0.5)
        assert "datamesh.read_ap" not in names_seen
    finally:
        flower.terminate()
        flower.wait(timeout=15)
