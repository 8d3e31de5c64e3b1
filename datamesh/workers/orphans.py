"""An embedded beat (``worker --beat``) that dies with its worker.

Celery runs an embedded beat as a child process of the worker's main process.  When that main
process is killed outright (SIGKILL, the OOM killer) its children are not told: the pool's processes
notice their closed pipes and exit, but the beat goes on as an orphan, publishing reaper passes and
index drains for ever, and the restarted worker starts a second beat beside it.  On Linux the beat
asks the kernel for a signal when its parent dies (``prctl(PR_SET_PDEATHSIG)``): SIGTERM, on which
beat saves its schedule and exits.  A parent that died before the request was made (between the
fork and the beat's start) is caught by comparing the parent's pid with the worker's, which the main
process records in the environment its children inherit.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys

MAIN_PID_ENV = "DATAMESH_WORKER_MAIN_PID"
_PR_SET_PDEATHSIG = 1


def record_main_process() -> None:
    """In the worker's main process, before it forks its beat: say who the beat's parent is."""
    os.environ[MAIN_PID_ENV] = str(os.getpid())


def exit_with_parent(sig: signal.Signals = signal.SIGTERM) -> bool:
    """Have this process sent ``sig`` when its parent dies; ``False`` where that cannot be asked
    (not Linux, no libc).  If the parent recorded by :func:`record_main_process` is gone already,
    the signal is sent now."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    main = os.environ.get(MAIN_PID_ENV)
    if main is not None and main.isdigit() and os.getppid() != int(main):
        os.kill(os.getpid(), sig)
    return True
