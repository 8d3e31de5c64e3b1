"""The seed example as written, the demo and the command line, run as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

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


def _parse_size(text: str) -> tuple[float, float]:
    """``"3.4MiB"`` as (bytes, how far the rounded figure may be from the true one)."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10), ("B", 1)):
        if text.endswith(unit):
            return float(text[: -len(unit)]) * scale, 0.051 * scale
    raise AssertionError(f"not a size: {text!r}")


class StatsRow(NamedTuple):
    memtable: tuple[float, float]
    levels: dict[int, int]
    run_bytes: tuple[float, float]
    pending: int
    w_amp: float
    s_amp: float


def _stats_rows(stdout: str) -> dict[str, StatsRow]:
    """``ap stats`` rows by shard: memtable and run bytes, runs per level, pending, W-amp, S-amp."""
    rows: dict[str, StatsRow] = {}
    for line in stdout.splitlines():
        fields = line.split()
        if not fields or not fields[0].endswith(".lsm"):
            continue
        name, memtable, *levels, run_bytes, pending, w_amp, s_amp = fields
        per_level = [level.removeprefix("L").split(":") for level in levels if level != "-"]
        rows[name] = StatsRow(
            memtable=_parse_size(memtable),
            levels={int(level): int(count) for level, count in per_level},
            run_bytes=_parse_size(run_bytes),
            pending=int(pending),
            w_amp=float(w_amp),
            s_amp=float(s_amp),
        )
    return rows


def test_ap_stats_reports_each_shards_memtable_runs_pending_compaction_and_amplification(tmp_path: Path) -> None:
    from collections import Counter

    from datamesh.storage.ap.lsm import DEFAULT_TIER_FANOUT, LsmShard
    from datamesh.storage.ap.lsm.log import FILE_HEADER
    from datamesh.storage.ap.lsm.manifest import load_manifest

    def rows(count: int, seed: int) -> list[tuple[bytes, bytes]]:
        return [(seed.to_bytes(4, "big") + i.to_bytes(12, "big"), bytes([i % 251]) * 200) for i in range(count)]

    ap = tmp_path / "ap" / "eu-west"
    fanout = DEFAULT_TIER_FANOUT  # what `ap stats` assumes, as every deployed shard uses it
    # Given shard 000 with fanout + 1 flushed tier-0 runs (a tier merge due) and 40 writes still only
    # in its log, held open by this process as a running writer would,
    pending = LsmShard(ap / "shard-000.lsm", memtable_bytes=1 << 30, background=False)
    for n in range(fanout + 1):
        pending.put_many(rows(300, n))
        pending.flush()
    unflushed = rows(40, 1000)
    pending.put_many(unflushed)
    # and shard 001 whose fanout runs were merged into one tier-1 run, then closed (nothing unflushed),
    merged = LsmShard(ap / "shard-001.lsm", memtable_bytes=1 << 30, background=False)
    for n in range(fanout):
        merged.put_many(rows(300, n))
        merged.flush()
    assert merged.wait_for_compactions()
    merged.close()
    try:
        # when `ap stats` runs in another process,
        out = run(["-m", "datamesh", "ap", "stats", "--dir", str(tmp_path / "ap")], tmp_path)
        unflushed_on_disk = sum(log.stat().st_size - len(FILE_HEADER) for log in (ap / "shard-000.lsm").glob("*.log"))
        manifests = {name: load_manifest(ap / name) for name in ("shard-000.lsm", "shard-001.lsm")}
    finally:
        pending.close()
    assert out.returncode == 0, out.stdout + out.stderr
    stats = _stats_rows(out.stdout)
    assert set(stats) == {"eu-west/shard-000.lsm", "eu-west/shard-001.lsm"}, out.stdout
    first, second = stats["eu-west/shard-000.lsm"], stats["eu-west/shard-001.lsm"]
    # then each shard's runs per level and run bytes are the manifest's,
    for row, name in ((first, "shard-000.lsm"), (second, "shard-001.lsm")):
        manifest = manifests[name]
        assert manifest is not None
        assert row.levels == dict(Counter(run.level for run in manifest.runs)), out.stdout
        on_disk = sum(run.file_bytes for run in manifest.runs)
        shown, rounding = row.run_bytes
        assert on_disk > 0 and abs(shown - on_disk) <= rounding, (row, on_disk)
    assert first.levels == {0: fanout + 1} and second.levels == {1: 1}
    # the memtable is the unflushed log's records: at least the 40 writes' keys and values, 0 when flushed,
    assert unflushed_on_disk >= sum(len(k) + len(v) for k, v in unflushed)
    shown, rounding = first.memtable
    assert unflushed_on_disk > 0 and abs(shown - unflushed_on_disk) <= rounding, (first, unflushed_on_disk)
    assert second.memtable[0] == 0
    # one tier merge is due in the first shard and none in the merged one,
    assert first.pending == 1 and second.pending == 0
    # every byte was written at least twice (log, then run) and the merge wrote it again,
    assert first.w_amp >= 2.0 and second.w_amp > first.w_amp, out.stdout
    # and the disk holds at least the payload.
    assert first.s_amp >= 1.0 and second.s_amp >= 1.0, out.stdout
    assert "memtable: bytes of records in unflushed logs" in out.stdout


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
