"""A worker started with ``--beat`` leaves no process behind when it is killed outright."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from tests.celery.conftest import Workers

EXIT_BOUND_S = 20.0


def children_of(pid: int) -> list[int]:
    """Every child of ``pid``, whichever of its threads forked it."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except FileNotFoundError:
            continue
    return sorted(set(found))


def alive(pid: int) -> bool:
    """Running, not a zombie waiting for its new parent to reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")


def test_an_embedded_beat_exits_when_its_worker_is_killed(workers: Workers) -> None:
    # Given a worker with an embedded beat (a child of the worker's main process, next to its pool),
    # started before anything made the data folder its schedule file goes in,
    assert not workers.config.data_dir.exists()
    worker = workers.start("--role", "index", "--region", "eu-west", "--beat")
    workers.wait_ready(1)
    deadline = time.monotonic() + EXIT_BOUND_S
    while len(children := children_of(worker.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(children) == 2, (children, workers.logs()[-3000:])  # the pool's one process and the beat
    assert list(workers.config.data_dir.glob("celerybeat-schedule-*")), workers.logs()[-3000:]
    # when the main process alone is SIGKILLed (the OOM killer, `kill -9` of one pid),
    os.kill(worker.pid, signal.SIGKILL)
    worker.wait()
    # then none of its children lives on: not the pool process, and not the beat, which would
    # otherwise go on publishing reaper passes and index drains beside the restarted worker's beat.
    deadline = time.monotonic() + EXIT_BOUND_S
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [pid for pid in children if alive(pid)], workers.logs()[-3000:]
