"""Real Redis and real ``celery worker`` subprocesses (never eager mode) for the Celery executor's tests.

Redis is the shared server on 127.0.0.1:6379, database 5 (flushed around each test), unless a test
starts its own.  The CP tier is a fresh PostgreSQL schema.  A missing service skips locally and fails
under ``CI=true``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import redis

from datamesh.core.config import DataMeshConfig
from datamesh.core.result import Err
from datamesh.pipeline.tiers import Tiers, readonly_engine_for
from datamesh.storage.cp import migrate
from datamesh.storage.cp.database import CpDatabase
from datamesh.workers.executor import CeleryExecutor
from tests.conftest import service_missing

ROOT = Path(__file__).resolve().parents[2]
TEST_REDIS_URL = os.environ.get("DATAMESH_TEST_REDIS_URL", "redis://127.0.0.1:6379/5")


def flush(url: str) -> None:
    client = redis.Redis.from_url(url)
    client.flushdb()
    client.close()


@pytest.fixture
def redis_url() -> Iterator[str]:
    try:
        flush(TEST_REDIS_URL)
    except redis.RedisError as exc:
        service_missing(f"Redis at {TEST_REDIS_URL}", exc)
    yield TEST_REDIS_URL
    flush(TEST_REDIS_URL)


@pytest.fixture
def migrated_pg(pg_url: str) -> str:
    db = CpDatabase.open(pg_url).unwrap()
    done = migrate.upgrade(db)
    db.dispose()
    if isinstance(done, Err):
        pytest.fail(f"migration failed: {done.error}")
    return pg_url


def env_of(config: DataMeshConfig) -> dict[str, str]:
    """The DATAMESH_* environment that makes a worker see ``config``."""
    return {
        "DATAMESH_EXECUTOR": "celery",
        "DATAMESH_DATA_DIR": str(config.data_dir),
        "DATAMESH_CP_URL": config.cp_url,
        "DATAMESH_AP_SHARDS": str(config.ap_shards),
        "DATAMESH_INLINE_MAX_BYTES": str(config.inline_max_bytes),
        "DATAMESH_BROKER_URL": config.broker_url,
        "DATAMESH_SAGA_LEASE_S": str(config.saga_lease_s),
        "DATAMESH_SAGA_QUEUE_TIMEOUT_S": str(config.saga_queue_timeout_s),
        "DATAMESH_SHARD_LEASE_S": str(config.shard_lease_s),
        "DATAMESH_REAP_INTERVAL_S": str(config.reap_interval_s),
        "DATAMESH_STEP_TIME_LIMIT_S": str(config.step_time_limit_s),
        "DATAMESH_VISIBILITY_TIMEOUT_S": str(config.visibility_timeout_s),
        "DATAMESH_STEP_MAX_DELIVERIES": str(config.step_max_deliveries),
        "DATAMESH_COMPENSATION_ATTEMPTS": str(config.compensation_attempts),
        "DATAMESH_REAPER_PIVOT_ATTEMPTS": str(config.reaper_pivot_attempts),
        "DATAMESH_AP_ENGINE": config.ap_engine,
    }


@pytest.fixture
def celery_config(request: pytest.FixtureRequest, tmp_path: Path, migrated_pg: str, redis_url: str) -> DataMeshConfig:
    """The workers' configuration; a test picks the AP engine with
    ``@pytest.mark.parametrize("celery_config", ["sqlite", "lsm"], indirect=True)`` (default SQLite)."""
    return DataMeshConfig(
        ap_engine=getattr(request, "param", "sqlite"),
        data_dir=tmp_path / "data",
        cp_url=migrated_pg,
        executor="celery",
        broker_url=redis_url,
        saga_lease_s=3.0,
        # a lost message (a kill, the broker restart) is reaped well within the tests' waits
        saga_queue_timeout_s=20.0,
        shard_lease_s=2.0,
        reap_interval_s=1.0,
        step_time_limit_s=20.0,
        visibility_timeout_s=60.0,
        saga_wait_s=60.0,
    )


@dataclass
class Workers:
    """``python -m datamesh worker`` subprocesses started by a test; stopped at teardown."""

    config: DataMeshConfig
    log_dir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    killed: list[subprocess.Popen[bytes]] = field(default_factory=list)  # nodes a test killed on purpose

    def start(self, *args: str, hooks_redis: str | None = None, **env: str) -> subprocess.Popen[bytes]:
        full = {**{k: v for k, v in os.environ.items() if not k.startswith("DATAMESH_")}, **env_of(self.config)}
        full["PYTHONPATH"] = str(ROOT)
        if hooks_redis:
            full["DATAMESH_TEST_HOOKS_REDIS"] = hooks_redis
        full.update(env)
        log = open(self.log_dir / f"worker-{len(self.procs) + len(self.killed)}.log", "wb")  # noqa: SIM115
        cmd = [
            sys.executable,
            "-m",
            "datamesh",
            "worker",
            "--loglevel",
            "INFO",
            "--include",
            "tests.celery_hooks",
            *args,
        ]
        # A session (and process group) of its own: teardown stops every process the worker made.
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def start_beat(self) -> subprocess.Popen[bytes]:
        full = {**{k: v for k, v in os.environ.items() if not k.startswith("DATAMESH_")}, **env_of(self.config)}
        full["PYTHONPATH"] = str(ROOT)
        log = open(self.log_dir / f"worker-beat-{len(self.procs) + len(self.killed)}.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "datamesh", "beat", "--loglevel", "INFO"]
        proc = subprocess.Popen(cmd, cwd=ROOT, env=full, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        return proc

    def wait_ready(self, count: int = 1, timeout: float = 60.0) -> list[str]:
        from datamesh.workers.app import create_app

        app = create_app(self.config, load_celeryconfig=False)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            replies = app.control.ping(timeout=0.5)
            if len(replies) >= count:
                return [name for reply in replies for name in reply]
            for proc in self.procs:
                if proc.poll() is not None:
                    raise AssertionError(f"worker exited with {proc.returncode}: {self.logs()[-3000:]}")
        raise AssertionError(f"workers not ready after {timeout}s: {self.logs()[-3000:]}")

    def logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in sorted(self.log_dir.glob("worker-*.log")))

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
            # Whatever the worker left behind (pool children, an embedded beat: a SIGKILLed main
            # process orphans them) would go on consuming and publishing on the next test's broker.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)

    def kill_node(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL one worker node's whole process group (its main process and pool, at once: no warm
        shutdown, the messages it had taken stay unacknowledged in the broker until the visibility
        timeout) and forget it, so that :meth:`wait_ready` does not take its exit for a failure."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        self.procs.remove(proc)
        self.killed.append(proc)

    def kill(self) -> None:
        """SIGKILL every process the workers made, at once: a test's teardown, its checks done (a
        warm shutdown, :meth:`stop`, takes ~3 s per test and nothing reads what it would flush)."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        for proc in self.procs:
            proc.wait()


async def eventually(check: Callable[[], object], timeout: float = 10.0) -> None:
    """Re-run ``check`` (an assertion) until it passes or ``timeout`` is spent (then its error stands).

    For what LSM shards show other processes only once their owner flushes (at least every
    ``DEFAULT_FLUSH_INTERVAL_S``): counts and deletes made by the workers.
    """
    deadline = time.monotonic() + timeout
    while True:
        try:
            check()
            return
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@contextlib.contextmanager
def caller(config: DataMeshConfig) -> Iterator[tuple[Tiers, CeleryExecutor]]:
    """A Celery-mode caller without a pipeline (no reaper of its own): its tiers, with the AP shards
    read-only as such a caller opens them, and its executor; both closed at the end."""
    tiers = Tiers.open(config, engine_factory=readonly_engine_for(config.ap_engine)).unwrap()
    executor = CeleryExecutor(tiers, config)
    try:
        yield tiers, executor
    finally:
        executor.close()
        tiers.close()


def run_cli(config: DataMeshConfig, *args: str) -> str:
    """``python -m datamesh ARGS`` in a subprocess that sees ``config``; its output (it must succeed)."""
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("DATAMESH_")}, **env_of(config)}
    env["PYTHONPATH"] = str(ROOT)
    out = subprocess.run([sys.executable, "-m", "datamesh", *args], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def runs_per_node(app: Any, task: str) -> dict[str, int]:
    """How many runs of ``task`` each worker node (by ``--name``) reports, its own count since it started."""
    stats = app.control.inspect(timeout=1.0).stats() or {}
    return {node.split(".", 1)[0]: s.get("total", {}).get(task, 0) for node, s in stats.items()}


def pool_children(pid: int) -> list[int]:
    """The prefork children of a Celery worker's main process."""
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except FileNotFoundError:
        return []
    return [int(p) for p in text.split()]


@pytest.fixture
def workers(celery_config: DataMeshConfig, tmp_path: Path) -> Iterator[Workers]:
    running = Workers(celery_config, tmp_path)
    yield running
    running.kill()
