"""Garbage-collector settings of a long-running datamesh process: a worker (set after it forks) and
the gateway (set before it serves).

A saga step makes and drops a few objects per turn by the hundred thousand (a decoded plan, rows,
events), nearly all freed by reference counting; the cyclic collector still ran a young-generation
pass every 700 net allocations (CPython's default threshold), each of which could cascade into full
passes over everything the process has imported (SQLAlchemy, numpy, the index libraries).  Measured
on the ingest path (``bench/bench_conv_cpu.py``, batches of 5,000): 79 µs of CPU per conversation
with the defaults, 67.5 with no collector at all, 70.6 with the young threshold at 50,000; the
Celery workers' step processes went from 127 to 77 µs a turn (``bench/bench_celery.py``).  So such
a process:

* freezes what exists after start-up (``gc.freeze``): imported modules and the runtime's handles
  are never collected, and no pass looks at them again;
* collects the young generation every :data:`YOUNG_THRESHOLD` allocations instead of 700, which
  still bounds the garbage of reference cycles (a few megabytes at most between passes).
"""

from __future__ import annotations

import gc

#: Net allocations between young-generation passes (CPython's default: 700).
YOUNG_THRESHOLD = 50_000


def tune() -> None:
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
