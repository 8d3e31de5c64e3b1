"""The seed example as written, the demo and the command line, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SEED = """
import asyncio
from datamesh.core.config import DataMeshConfig
from datamesh.core.types import EntityId, GeoRegion
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest

async def main():
    config = DataMeshConfig.from_env().unwrap()
    pipeline = await IngestionPipeline.create(config)
    if pipeline.is_err():
        print(f"Error: {pipeline.error}")
        return
    async with pipeline.unwrap() as p:
        request = IngestionRequest(
            entity_id=EntityId.generate(),
            prompt=b"What is the capital of France?",
            response=b"The capital of France is Paris.",
            geo_region=GeoRegion.EU_WEST,
        )
        result = await p.ingest(request)
        if result.is_ok():
            resp = result.unwrap()
            print(f"Ingested: {resp.conversation_id}")
            print(f"Latency: {resp.latency_ms:.2f}ms")

asyncio.run(main())
"""


def run(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DATAMESH_")}
    clean["PYTHONPATH"] = str(ROOT)
    clean.update(env)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=clean, capture_output=True, text=True, timeout=120)


def test_seed_example_runs_as_written_without_environment(tmp_path: Path) -> None:
    (tmp_path / "seed.py").write_text(SEED)
    out = run(["seed.py"], tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("Ingested: ") and lines[1].startswith("Latency: ")
    assert (tmp_path / "datamesh-data" / "cp.sqlite3").is_file()


def test_demo_ingests_replays_and_reads_back(tmp_path: Path) -> None:
    out = run(["-m", "datamesh"], tmp_path)
    assert out.returncode == 0, out.stderr
    assert "replayed 10 requests: 10 deduplicated, 10 same ids" in out.stdout
    assert "content verified: True" in out.stdout and "kept in the objects tier" in out.stdout
    assert "p99" in out.stdout
    verify = run(["-m", "datamesh", "provenance", "verify"], tmp_path)
    assert verify.returncode == 0 and "0 broken" in verify.stdout
    listed = run(["-m", "datamesh", "sagas"], tmp_path)
    assert "committed" in listed.stdout and "dead          0" in listed.stdout


def test_help_lists_the_commands(tmp_path: Path) -> None:
    out = run(["-m", "datamesh", "--help"], tmp_path)
    assert out.returncode == 0
    for command in ("demo", "migrate", "sagas", "reap", "provenance"):
        assert command in out.stdout


@pytest.mark.parametrize("variable", ["DATAMESH_AP_SHARDS", "DATAMESH_CP_URL"])
def test_bad_configuration_is_a_clear_error(tmp_path: Path, variable: str) -> None:
    out = run(["-m", "datamesh"], tmp_path, **{variable: "bogus"})
    assert out.returncode == 2 and variable in out.stderr


def _head() -> str:
    from datamesh.storage.cp import migrate
    from datamesh.storage.cp.database import CpDatabase

    head = migrate.head_revision(CpDatabase.open("sqlite://").unwrap())
    assert head is not None
    return head


def test_migrate_command(tmp_path: Path) -> None:
    out = run(["-m", "datamesh", "migrate"], tmp_path, DATAMESH_CP_URL=f"sqlite:///{tmp_path / 'm.sqlite3'}")
    assert out.returncode == 0 and f"revision {_head()}" in out.stdout


def test_objects_verify_and_gc_commands(tmp_path: Path) -> None:
    assert run(["-m", "datamesh", "demo", "--conversations", "4"], tmp_path).returncode == 0
    clean = run(["-m", "datamesh", "objects", "verify"], tmp_path)
    assert clean.returncode == 0 and "0 problems found" in clean.stdout
    blob = next(p for p in (tmp_path / "datamesh-data" / "objects").rglob("*") if p.is_file() and len(p.name) == 64)
    blob.write_bytes(b"rot" + blob.read_bytes()[3:])
    dirty = run(["-m", "datamesh", "objects", "verify"], tmp_path)
    assert dirty.returncode == 1 and f"CORRUPT eu-west {blob.name}" in dirty.stdout
    gc = run(["-m", "datamesh", "objects", "gc", "--grace-s", "0"], tmp_path)
    assert gc.returncode == 0 and "0 deleted" in gc.stdout  # the corrupt blob is still referenced


def test_keys_create_list_revoke(tmp_path: Path) -> None:
    env = {"DATAMESH_CP_URL": f"sqlite:///{tmp_path / 'k.sqlite3'}"}
    made = run(
        ["-m", "datamesh", "keys", "create", "--tenant", "acme", "--principal", "ops", "--role", "reader"],
        tmp_path,
        **env,
    )
    assert made.returncode == 0, made.stdout + made.stderr
    raw = next(line.split()[-1] for line in made.stdout.splitlines() if line.startswith("api key:"))
    _, key_id, secret = raw.split("_", 2)  # the secret is URL-safe base64 and may itself hold "_"
    listed = run(["-m", "datamesh", "keys", "list"], tmp_path, **env)
    assert key_id in listed.stdout and "active" in listed.stdout and secret not in listed.stdout
    assert run(["-m", "datamesh", "keys", "revoke", key_id], tmp_path, **env).returncode == 0
    assert "revoked" in run(["-m", "datamesh", "keys", "list", "--tenant", "acme"], tmp_path, **env).stdout
    assert run(["-m", "datamesh", "keys", "revoke", "0000000000000000"], tmp_path, **env).returncode == 1


def test_migrate_command_on_postgresql(pg_url: str, tmp_path: Path) -> None:
    # Given an empty PostgreSQL schema, when `migrate` runs, then it reaches the head revision,
    up = run(["-m", "datamesh", "migrate"], tmp_path, DATAMESH_CP_URL=pg_url)
    assert up.returncode == 0 and f"revision {_head()}" in up.stdout, up.stdout + up.stderr
    # ... running it again changes nothing,
    again = run(["-m", "datamesh", "migrate"], tmp_path, DATAMESH_CP_URL=pg_url)
    assert again.returncode == 0 and f"revision {_head()}" in again.stdout
    # ... `--downgrade --revision base` empties the schema and a second upgrade rebuilds it.
    down = run(["-m", "datamesh", "migrate", "--downgrade", "--revision", "base"], tmp_path, DATAMESH_CP_URL=pg_url)
    assert down.returncode == 0 and "revision None" in down.stdout, down.stdout + down.stderr
    up = run(["-m", "datamesh", "migrate"], tmp_path, DATAMESH_CP_URL=pg_url)
    assert up.returncode == 0 and f"revision {_head()}" in up.stdout
    # and the pipeline's commands work on it.
    verify = run(["-m", "datamesh", "provenance", "verify"], tmp_path, DATAMESH_CP_URL=pg_url)
    assert verify.returncode == 0 and "0 chains verified, 0 broken" in verify.stdout, verify.stdout + verify.stderr


def test_demo_on_the_lsm_engine_and_ap_stats(tmp_path: Path) -> None:
    out = run(["-m", "datamesh", "demo", "--conversations", "8"], tmp_path, DATAMESH_AP_ENGINE="lsm")
    assert out.returncode == 0 and "content verified: True" in out.stdout, out.stdout + out.stderr
    assert list((tmp_path / "datamesh-data" / "ap" / "eu-west").glob("shard-*.lsm"))
    stats = run(["-m", "datamesh", "ap", "stats"], tmp_path, DATAMESH_AP_ENGINE="lsm")
    assert stats.returncode == 0 and "shard-" in stats.stdout, stats.stdout + stats.stderr


async def test_sagas_retry_redrives_only_dead_or_stuck_sagas(tmp_path: Path) -> None:
    from datetime import timedelta

    from sqlalchemy import update

    from datamesh.core.config import DataMeshConfig
    from datamesh.core.types import EntityId, GeoRegion
    from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
    from datamesh.storage.cp import sagas
    from datamesh.storage.cp.sql import utcnow
    from tests.helpers import tier_counts

    class Crash(BaseException):
        """Stands for the driving process dying mid-saga."""

    def crash(step: str, phase: str) -> None:
        if (step, phase) == ("write_ap", "before"):
            raise Crash()

    # Given a saga whose driver died before writing its content: running, its lease still live
    config = DataMeshConfig(data_dir=tmp_path / "datamesh-data")
    request = IngestionRequest(entity_id=EntityId.generate(), prompt=b"q", response=b"a", geo_region=GeoRegion.EU_WEST)
    async with (await IngestionPipeline.create(config, faults=crash)).unwrap() as p:
        with pytest.raises(Crash):
            await p.ingest(request)
        (saga_id,) = p.tiers.cp.run(lambda c: sagas.list_by_status(c, sagas.SagaStatus.RUNNING), operation="t").unwrap()
    # When `sagas retry` is asked to re-drive it, then it refuses: a live driver may still finish it
    live = run(["-m", "datamesh", "sagas", "retry", saga_id], tmp_path)
    assert live.returncode == 1 and "lease is live" in live.stdout, live.stdout + live.stderr
    # Once its lease has expired (no driver left), the same command compensates it
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        expire = update(sagas.SAGAS).values(lease_expires_at=utcnow() - timedelta(seconds=1))
        p.tiers.cp.run(lambda c: c.execute(expire), operation="t").unwrap()
    stuck = run(["-m", "datamesh", "sagas", "retry", saga_id], tmp_path)
    assert stuck.returncode == 0 and "compensated" in stuck.stdout, stuck.stdout + stuck.stderr
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        assert tier_counts(p.tiers).rows["idempotency_keys"] == 0
        record = p.tiers.cp.run(lambda c: sagas.load(c, saga_id), operation="t").unwrap()
        assert record is not None and record.status == sagas.SagaStatus.COMPENSATED
    # And a finished saga is left alone, with the reason
    done = run(["-m", "datamesh", "sagas", "retry", saga_id], tmp_path)
    assert done.returncode == 1 and "compensated: nothing to re-drive" in done.stdout
    missing = run(["-m", "datamesh", "sagas", "retry", "no-such-saga"], tmp_path)
    assert missing.returncode == 1 and "no saga no-such-saga" in missing.stdout
