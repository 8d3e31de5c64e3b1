"""CPU seconds by part of a distributed run, read from ``/proc`` (Linux): what each kind of process
spent, so a rate can be set against the CPU it took.

Parts: ``caller`` (this process), ``step workers`` and ``index worker`` (the worker pool's process
tree under ``root_pid``; a Celery worker whose ``-Q`` holds only ``index.*`` queues is the index
worker, and an ``all`` worker of one process, which also drains the index, counts as a step
worker), ``postgres`` (the backends whose ``application_name`` is ``app_name``: the run's own
connections, not other users'), ``redis`` (the broker's server process, when it runs on this host).
"""

from __future__ import annotations

import os
import time
from collections import Counter
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.engine import Engine

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _children(pid: int) -> list[int]:
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += _children(p)
    return out


def _worker_part(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "step workers"
    if b"-Q" in argv:
        names = argv[argv.index(b"-Q") + 1].split(b",")
        if all(n.startswith(b"index.") for n in names):
            return "index worker"
    return "step workers"


class CpuMeter:
    """``snapshot()`` → CPU seconds so far by part; differences of two snapshots give a run's CPU.
    ``root_pid`` ``None``: no worker pool (the local executor runs in the caller)."""

    def __init__(self, root_pid: int | None, pg_admin: Engine, app_name: str, redis_pid: int | None) -> None:
        self.root_pid, self.pg_admin, self.app_name, self.redis_pid = root_pid, pg_admin, app_name, redis_pid

    def snapshot(self) -> Counter[str]:
        parts: Counter[str] = Counter()
        parts["caller"] = time.process_time()
        for pid in _tree(self.root_pid) if self.root_pid is not None else []:
            parts[_worker_part(pid)] += cpu_seconds(pid) or 0.0  # a pool child has its main process's cmdline
        with self.pg_admin.connect() as conn:
            pids = conn.execute(
                text("SELECT pid FROM pg_stat_activity WHERE application_name = :a"), {"a": self.app_name}
            ).scalars()
            parts["postgres"] = sum(cpu_seconds(int(p)) or 0.0 for p in pids)
        if self.redis_pid is not None:
            parts["redis"] = cpu_seconds(self.redis_pid) or 0.0
        return parts


def per_item_us(before: Counter[str], after: Counter[str], items: int) -> dict[str, float]:
    """µs of CPU per item by part, and ``total``.  A PostgreSQL backend that closed between the two
    snapshots takes its CPU with it: that part is then a lower bound (never negative)."""
    out = {part: max(0.0, after[part] - before[part]) * 1e6 / items for part in sorted(set(before) | set(after))}
    out["total"] = sum(out.values())
    return out
