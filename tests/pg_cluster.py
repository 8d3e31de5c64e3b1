"""A throwaway PostgreSQL 15 primary + streaming standby, built from the machine's binaries.

Servers run as the ``postgres`` OS user on free ports with data directories in a temporary folder;
:meth:`PgCluster.destroy` stops whatever is left and removes the folder.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text

PG_BIN = Path(os.environ.get("DATAMESH_TEST_PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVER_OPTIONS = "-c listen_addresses=127.0.0.1 -c shared_buffers=16MB -c max_wal_senders=4 -c wal_level=replica"


class ClusterUnavailable(Exception):
    """The binaries, the postgres user or a free port are missing."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class PgCluster:
    root: Path
    primary_port: int
    standby_port: int
    logs: list[str] = field(default_factory=list)

    @property
    def primary(self) -> Path:
        return self.root / "primary"

    @property
    def standby(self) -> Path:
        return self.root / "standby"

    def url(self, port: int) -> str:
        return f"postgresql+psycopg2://postgres@127.0.0.1:{port}/postgres"

    # ---- running binaries as postgres --------------------------------------------------------

    def _pg(self, tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        cmd = ["runuser", "-u", "postgres", "--", str(PG_BIN / tool), *args]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        self.logs.append(f"$ {' '.join(cmd)}\n{out.stdout}{out.stderr}")
        if out.returncode != 0:
            raise RuntimeError(f"{tool} failed ({out.returncode}): {out.stderr or out.stdout}")
        return out

    def start(self, data: Path, port: int) -> None:
        options = f"-p {port} -k {self.root} {SERVER_OPTIONS}"
        self._pg("pg_ctl", "-D", str(data), "-o", options, "-l", str(data.with_suffix(".log")), "-w", "start")

    def stop(self, data: Path, mode: str = "fast") -> None:
        self._pg("pg_ctl", "-D", str(data), "-m", mode, "-w", "stop")

    def kill_primary(self) -> None:
        """SIGKILL the primary's postmaster and every backend of it: a crash, not a shutdown."""
        pid = int((self.primary / "postmaster.pid").read_text().splitlines()[0])
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
        for victim in [pid, *(int(c) for c in children.stdout.split())]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(victim, signal.SIGKILL)

    def promote(self) -> None:
        self._pg("pg_ctl", "-D", str(self.standby), "-w", "promote")

    # ---- building -----------------------------------------------------------------------------

    @classmethod
    def create(cls) -> PgCluster:
        if not (PG_BIN / "initdb").is_file() or shutil.which("runuser") is None:
            raise ClusterUnavailable(f"PostgreSQL binaries not found in {PG_BIN}")
        try:
            user = pwd.getpwnam("postgres")
        except KeyError as exc:
            raise ClusterUnavailable("no postgres OS user") from exc
        root = Path(tempfile.mkdtemp(prefix="dm-pgcluster-"))
        os.chown(root, user.pw_uid, user.pw_gid)
        cluster = cls(root, _free_port(), _free_port())
        try:
            cluster._pg("initdb", "-D", str(cluster.primary), "-A", "trust", "-U", "postgres", "--no-sync")
            cluster.start(cluster.primary, cluster.primary_port)
            cluster._pg(
                "pg_basebackup",
                "-h", "127.0.0.1", "-p", str(cluster.primary_port), "-U", "postgres",
                "-D", str(cluster.standby), "-R", "-X", "stream", "-c", "fast", "--no-sync",
            )  # fmt: skip
            cluster.start(cluster.standby, cluster.standby_port)
            cluster.sql(cluster.primary_port, "ALTER SYSTEM SET synchronous_standby_names = '*'")
            cluster.sql(cluster.primary_port, "SELECT pg_reload_conf()")
            cluster.wait_for_sync_standby()
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    def sql(self, port: int, statement: str) -> list[tuple[object, ...]]:
        engine = create_engine(self.url(port), isolation_level="AUTOCOMMIT")
        try:
            with engine.connect() as conn:
                result = conn.execute(text(statement))
                return [tuple(r) for r in result] if result.returns_rows else []
        finally:
            engine.dispose()

    def wait_for_sync_standby(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        query = "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming' AND sync_state = 'sync'"
        while time.monotonic() < deadline:
            if self.sql(self.primary_port, query)[0][0] == 1:
                return
            time.sleep(0.1)
        raise RuntimeError("the standby never became a streaming synchronous standby")

    def destroy(self) -> None:
        for data in (self.standby, self.primary):
            if (data / "postmaster.pid").exists():
                with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                    self.stop(data, "immediate")
        shutil.rmtree(self.root, ignore_errors=True)
