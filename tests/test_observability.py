"""Observability: the no-loss ledger, tail sampling, one trace across processes, JSON logs, promtool."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import update
from sqlalchemy.engine import Connection

from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import SagaFailed
from datamesh.core.result import Err
from datamesh.core.types import EntityId, GeoRegion
from datamesh.observability import ledger, logs, metrics, tracing
from datamesh.pipeline.ingestion import IngestionPipeline, IngestionRequest
from datamesh.pipeline.saga import InjectedFault, reap
from datamesh.pipeline.steps import Step
from datamesh.storage.cp import sagas
from datamesh.storage.cp.sql import utcnow
from tests.conftest import CI
from tests.helpers import real_requests

ROOT = Path(__file__).resolve().parents[1]


class Crash(BaseException):
    """Stands for the process dying mid-saga: not caught by the saga's failure handling."""


class Faults:
    """Fails (``InjectedFault``) or crashes (``Crash``) at one step, when armed."""

    def __init__(self) -> None:
        self.at: tuple[str, str] | None = None
        self.crash = False

    def __call__(self, step: str, phase: str) -> None:
        if (step, phase) == self.at:
            raise Crash() if self.crash else InjectedFault(f"injected at {phase} {step}")


def expire_leases(conn: Connection) -> None:
    conn.execute(update(sagas.SAGAS).values(lease_expires_at=utcnow() - timedelta(seconds=1)))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on with an in-memory exporter; success sample rate 0 unless a test changes it."""
    exporter = InMemorySpanExporter()
    tracing.setup(service_name="test", sample_rate=0.0, exporter=exporter)
    yield exporter
    tracing.shutdown()


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if CI:
            pytest.fail("promtool is not installed (apt-get install prometheus)")
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


# ---- the no-loss ledger ----------------------------------------------------------------------------


async def test_ledger_balances_after_step_failures_crashes_and_reaping(config: DataMeshConfig) -> None:
    faults = Faults()
    before = ledger.snapshot()
    async with (await IngestionPipeline.create(config, faults=faults)).unwrap() as p:
        # Given batches that succeed, fail at every step (compensated), and replay earlier requests,
        ok = real_requests(5)
        assert all(r.is_ok() for r in (await p.ingest_many(ok)).unwrap())
        for at in [(Step.RESERVE, "after"), (Step.STORE_BLOBS, "before"), (Step.WRITE_AP, "after")]:
            faults.at = at
            failed = (await p.ingest_many(real_requests(3))).unwrap()
            assert all(isinstance(r, Err) and isinstance(r.error, SagaFailed) for r in failed)
        faults.at = (Step.RESERVE, "before")  # fails before anything is accepted: a refusal
        assert (await p.ingest(real_requests(1)[0])).is_err()
        faults.at = None
        assert all(r.unwrap().deduplicated for r in (await p.ingest_many(ok[:2])).unwrap())
        bad = IngestionRequest(entity_id=EntityId.generate(), prompt=b"", response=b"x", geo_region=GeoRegion.EU_WEST)
        assert (await p.ingest(bad)).is_err()
        mid = ledger.snapshot() - before
        # then every accepted turn is persisted or compensated; replays and refusals are apart.
        assert (mid.accepted, mid.persisted, mid.compensated, mid.in_flight) == (14, 5, 9, 0)
        assert (mid.deduplicated, mid.rejected, mid.lost) == (2, 2, 0)

        # When drivers crash after AP content (driven forward) and before it (compensated),
        faults.crash = True
        for at, n in [((Step.COMMIT_CP, "before"), 4), ((Step.WRITE_AP, "before"), 2)]:
            faults.at = at
            with pytest.raises(Crash):
                await p.ingest_many(real_requests(n))
        faults.at = None
        crashed = ledger.snapshot() - before
        # the crashed sagas' turns are in flight: not lost,
        assert (crashed.accepted, crashed.in_flight, crashed.lost) == (20, 6, 0)
        # and the reaper settles them, counting each turn once even when reaping twice.
        p.tiers.cp.run(expire_leases, operation="t").unwrap()
        assert sorted(o.action for o in reap(p.tiers)) == ["committed", "compensated"]
        assert reap(p.tiers) == []
        after = ledger.snapshot() - before
        assert (after.accepted, after.persisted, after.compensated, after.in_flight) == (20, 9, 11, 0)
        assert after.lost == 0 and after.dead_letter == 0
        # The saga-log gauges agree with the CP tier.
        assert metrics.SAGA_LOG.labels("running")._value.get() == 0
        assert metrics.SAGA_OLDEST_OPEN_AGE._value.get() == 0


# ---- traces ----------------------------------------------------------------------------------------


async def test_tail_sampling_keeps_failed_traces_whole_and_successes_at_the_rate(
    config: DataMeshConfig, spans: InMemorySpanExporter
) -> None:
    faults = Faults()
    async with (await IngestionPipeline.create(config, faults=faults)).unwrap() as p:
        requests = real_requests(2)
        # Given a success sample rate of 0, a successful ingest leaves no span,
        assert (await p.ingest_many(requests)).is_ok()
        tracing.force_flush()
        assert spans.get_finished_spans() == ()
        # while a failing ingest is exported whole: the call, every step, every tier call, the undo.
        faults.at = (Step.WRITE_AP, "after")
        assert (await p.ingest_many(real_requests(2))).unwrap()[0].is_err()
        tracing.force_flush()
        kept = spans.get_finished_spans()
        assert len({s.context.trace_id for s in kept}) == 1
        names = {s.name for s in kept}
        assert {"pipeline.ingest_many", "saga.reserve", "saga.write_ap", "saga.undo_reserve"} <= names
        assert {"cp.saga.reserve", "ap.put_many", "ap.delete_many"} <= names
        root = next(s for s in kept if s.name == "pipeline.ingest_many")
        assert root.parent is None and root.status.status_code.name == "ERROR"
        by_id = {s.context.span_id for s in kept}
        assert all(s.parent is None or s.parent.span_id in by_id for s in kept)  # nothing missing
        saga_ids = {s.attributes.get("datamesh.saga_id") for s in kept if s.name == "saga.write_ap"}
        assert len(saga_ids) == 1 and None not in saga_ids
        # No attribute carries payload content.
        payload = {r.prompt.decode() for r in requests} | {r.response.decode() for r in requests}
        values = {str(v) for s in kept for v in (s.attributes or {}).values()}
        assert not any(text in v for v in values for text in payload)
        # With a rate of 1 every success is kept.
        spans.clear()
        faults.at = None
        sampler = tracing.sampler()
        assert sampler is not None
        sampler.rate = 1.0
        assert (await p.ingest(real_requests(1)[0])).is_ok()
        tracing.force_flush()
        assert {s.name for s in spans.get_finished_spans()} >= {"pipeline.ingest_many", "saga.commit_cp"}


def test_success_decision_is_the_same_in_every_process() -> None:
    ids = [int.from_bytes(os.urandom(16), "big") for _ in range(20_000)]
    kept = sum(tracing.keep_success(t, 0.01) for t in ids)
    assert 100 < kept < 300  # about 1 %
    assert all(tracing.keep_success(t, 0.01) == tracing.keep_success(t, 0.01) for t in ids[:100])
    assert not any(tracing.keep_success(t, 0.0) for t in ids) and all(tracing.keep_success(t, 1.0) for t in ids)


def _read_spans(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _child(tmp_path: Path, traceparent: str, name: str, rate: str, *fail: str) -> int:
    env = {
        **os.environ,
        "DATAMESH_DATA_DIR": str(tmp_path / f"child-{name}"),
        "DATAMESH_TRACE_FILE": str(tmp_path / "spans.jsonl"),
        "DATAMESH_TRACE_SAMPLE_RATE": rate,
        "DATAMESH_SERVICE_NAME": "child",
        "DATAMESH_LOG_LEVEL": "ERROR",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run(
        [sys.executable, "-m", "tests.obs_child", "ingest", traceparent, *fail],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=120,
    )
    assert done.returncode in (0, 3), done.stderr.decode()[-2000:]
    return done.returncode


@pytest.mark.parametrize("cp_url", ["sqlite"], indirect=True)
def test_one_ingest_is_one_trace_across_processes(tmp_path: Path, cp_url: str) -> None:
    # Given this process exporting to the same JSON-lines file as a second process,
    out = tmp_path / "spans.jsonl"
    tracing.setup(service_name="parent", sample_rate=1.0, trace_file=out)
    try:
        # when the parent's span hands its context to a real child process that runs an ingest,
        with tracing.span("parent.request") as parent:
            headers = tracing.inject({})
            assert _child(tmp_path, headers["traceparent"], "ok", "1.0") == 0
        tracing.force_flush()
        records = _read_spans(out)
        # then both processes' spans form one trace, the child's root a child of the parent's span.
        assert {r["trace_id"] for r in records} == {format(parent.get_span_context().trace_id, "032x")}  # type: ignore[union-attr]
        assert {r["service"] for r in records} == {"parent", "child"}
        child_root = next(r for r in records if r["name"] == "child.task")
        assert child_root["parent_remote"] and child_root["parent_span_id"] == format(
            parent.get_span_context().span_id,  # type: ignore[union-attr]
            "016x",
        )
        assert {"pipeline.ingest_many", "saga.commit_cp", "cp.saga.commit_cp"} <= {str(r["name"]) for r in records}

        # With a success rate of 0 in both processes, a successful trace is dropped by both,
        out.unlink()
        tracing.setup(service_name="parent", sample_rate=0.0, trace_file=out)
        with tracing.span("parent.request"):
            assert _child(tmp_path, tracing.inject({})["traceparent"], "drop", "0.0") == 0
        tracing.force_flush()
        assert _read_spans(out) == []
        # and a trace that failed in the child is kept by both (the failure reaches the parent).
        with tracing.span("parent.request") as parent:
            code = _child(tmp_path, tracing.inject({})["traceparent"], "fail", "0.0", "write_ap")
            assert code == 3
            tracing.set_error("child failed")
        tracing.force_flush()
        records = _read_spans(out)
        assert {r["service"] for r in records} == {"parent", "child"}
        assert len({r["trace_id"] for r in records}) == 1
        assert any(r["name"] == "saga.undo_write_ap" for r in records)
    finally:
        tracing.shutdown()


# ---- logs ------------------------------------------------------------------------------------------


async def test_logs_are_json_lines_with_ids_sampled_like_traces_and_free_of_payload(
    config: DataMeshConfig, spans: InMemorySpanExporter
) -> None:
    stream = io.StringIO()
    handler = logs.install(level="INFO", sample_rate=0.0, stream=stream)
    faults = Faults()
    try:
        async with (await IngestionPipeline.create(config, faults=faults)).unwrap() as p:
            requests = [
                *real_requests(4),
                IngestionRequest(
                    entity_id=EntityId.generate(),
                    prompt=b"SECRET-PROMPT-" + b"p" * (config.inline_max_bytes + 1),
                    response=b"SECRET-RESPONSE",
                    geo_region=GeoRegion.US_EAST,
                ),
            ]
            # Given successes (sampled out at rate 0) and a failing saga,
            assert all(r.is_ok() for r in (await p.ingest_many(requests[:2])).unwrap())
            faults.at = (Step.STORE_BLOBS, "after")
            failed = (await p.ingest_many(requests[2:])).unwrap()
            faults.at = None
            tracing.force_flush()
            # and a success kept at rate 1,
            sampler = tracing.sampler()
            assert sampler is not None
            sampler.rate = 1.0
            kept = await p.ingest(real_requests(1, model="claude")[0])
            assert kept.is_ok()
    finally:
        logging.getLogger("datamesh").removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    # then every line is a JSON object with the ids,
    assert lines and all(
        set(line) >= {"time", "level", "message", "trace_id", "span_id", "saga_id", "conversation_id"} for line in lines
    )
    failure = failed[0].error
    assert isinstance(failure, SagaFailed)
    warnings = [line for line in lines if line["level"] == "WARNING"]
    assert any(line["saga_id"] == failure.saga_id and line["trace_id"] for line in warnings)
    # the sampled-out successes left nothing, the kept one its INFO line,
    infos = [line for line in lines if line["level"] == "INFO"]
    assert len(infos) == 1 and infos[0]["trace_id"] and "ingest of 1 items" in infos[0]["message"]
    assert infos[0]["conversation_id"] == str(kept.unwrap().conversation_id)  # a single turn names its conversation
    # and no prompt or response bytes appear anywhere.
    text = stream.getvalue()
    assert "SECRET" not in text
    for r in requests[:4]:
        assert r.prompt.decode()[:40] not in text and r.response.decode()[:40] not in text


# ---- Prometheus: a real scrape and promtool ----------------------------------------------------------


@pytest.mark.parametrize("cp_url", ["sqlite"], indirect=True)
def test_scrape_of_a_real_process_passes_promtool_and_balances(tmp_path: Path, cp_url: str) -> None:
    tool = promtool()
    env = {
        **os.environ,
        "DATAMESH_DATA_DIR": str(tmp_path / "child"),
        "DATAMESH_LOG_LEVEL": "ERROR",
        "PYTHONPATH": str(ROOT),
    }
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    child = subprocess.Popen(
        [sys.executable, "-m", "tests.obs_child", "serve", "4"],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert child.stdout is not None
        line = child.stdout.readline().decode()
        assert line.startswith("PORT "), child.stderr.read().decode()[-2000:] if child.stderr else ""
        with urllib.request.urlopen(f"http://127.0.0.1:{line.split()[1]}/metrics", timeout=30) as response:
            body = response.read()
    finally:
        if child.stdin:
            child.stdin.close()
        child.wait(timeout=60)
    checked = subprocess.run([tool, "check", "metrics"], input=body, capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    text = body.decode()
    value = {m[0]: float(m[1]) for m in re.findall(r'^(datamesh_ingest_\w+)\{region="eu-west"\} (\S+)$', text, re.M)}
    assert value["datamesh_ingest_accepted_turns_total"] == 12
    assert value["datamesh_ingest_persisted_turns_total"] == 8
    assert value["datamesh_ingest_compensated_turns_total"] == 4
    assert value["datamesh_ingest_in_flight_turns"] == 0
    assert "datamesh_tier_calls_total" in text and 'step="write_ap"' in text


@pytest.mark.parametrize("cp_url", ["sqlite"], indirect=True)
def test_multiprocess_mode_merges_processes(tmp_path: Path, cp_url: str) -> None:
    tool = promtool()
    directory = tmp_path / "prom"
    directory.mkdir()
    env = {
        **os.environ,
        "DATAMESH_DATA_DIR": str(tmp_path / "child"),
        "DATAMESH_LOG_LEVEL": "ERROR",
        "PYTHONPATH": str(ROOT),
        "PROMETHEUS_MULTIPROC_DIR": str(directory),
    }
    # Given two worker processes that ingested and exited,
    for _ in range(2):
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.obs_child", "serve", "2"], cwd=ROOT, env=env, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        assert child.stdout is not None and child.stdout.readline().startswith(b"PORT ")
        child.communicate(b"", timeout=60)
    # when `python -m datamesh metrics` renders the directory,
    done = subprocess.run(
        [sys.executable, "-m", "datamesh", "metrics"], cwd=ROOT, env=env, capture_output=True, timeout=120
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    # then it passes promtool and sums both processes' ledgers.
    checked = subprocess.run([tool, "check", "metrics"], input=done.stdout, capture_output=True, timeout=60)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()
    text = done.stdout.decode()
    assert 'datamesh_ingest_accepted_turns_total{region="eu-west"} 12.0' in text
    assert 'datamesh_ingest_persisted_turns_total{region="eu-west"} 8.0' in text
    assert 'datamesh_saga_log_sagas{outcome="committed"}' in text


def test_shipped_prometheus_config_and_alert_rules_pass_promtool() -> None:
    tool = promtool()
    for args in (
        ["check", "rules", "deploy/prometheus/alerts.yml"],
        ["check", "config", "deploy/prometheus/prometheus.yml"],
    ):
        done = subprocess.run([tool, *args], cwd=ROOT, capture_output=True, timeout=60)
        assert done.returncode == 0, done.stdout.decode() + done.stderr.decode()


def test_readme_documents_every_variable() -> None:
    source = (ROOT / "datamesh" / "core" / "config.py").read_text()
    readme = (ROOT / "README.md").read_text()
    variables = set(re.findall(r'"(DATAMESH_[A-Z0-9_]+)"', source))
    assert "DATAMESH_TRACE_SAMPLE_RATE" in variables
    missing = sorted(v for v in variables if f"`{v}`" not in readme)
    assert missing == []


async def test_ledger_moves_dead_lettered_turns_out_when_re_driven(
    config: DataMeshConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    from datamesh.core.errors import StorageError
    from datamesh.core.result import Err as E
    from datamesh.pipeline import compensation

    faults = Faults()
    before = ledger.snapshot()
    async with (await IngestionPipeline.create(config, faults=faults)).unwrap() as p:
        # Given a saga whose compensation keeps failing,
        monkeypatch.setattr(
            compensation, "undo_write_ap", lambda tiers, plan: E(StorageError("ap", "delete_many", "disk gone"))
        )
        faults.at = (Step.WRITE_AP, "after")
        failed = (await p.ingest_many(real_requests(3))).unwrap()
        failure = failed[0].error
        assert isinstance(failure, SagaFailed) and failure.dead_lettered
        dead = ledger.snapshot() - before
        # its turns are dead-lettered, not lost;
        assert (dead.accepted, dead.dead_letter, dead.in_flight, dead.lost) == (3, 3, 0, 0)
        # re-driven once the tier is back, they move from dead-lettered to compensated.
        monkeypatch.undo()
        redriven = compensation.compensate_with_retries(p.tiers, failure.saga_id, failed_step="retry", error="re")
        assert redriven.unwrap().value == "compensated"
        after = ledger.snapshot() - before
        assert (after.compensated, after.dead_letter, after.lost) == (3, 0, 0)
        assert (ledger.snapshot().accepted - before.accepted) == 3
