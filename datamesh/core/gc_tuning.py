"""Garbage-collector settings of a long-running datamesh process: a worker (set after it forks) and
the gateway (set before it serves).

A saga step makes and drops a few objects per turn by the hundred thousand (a decoded plan, rows,
events), nearly all freed by reference counting; the cyclic collector still ran a young-generation
pass every 700 net allocations (CPython's default threshold), each of which could cascade into full
passes over everything the process has imported (SQLAlchemy, numpy, the index libraries).  Measured
on the ingest path (``bench/bench_conv_cpu.py --gc default|tuned|off``, batches of 5,000): 85.2 µs
of CPU per conversation with the defaults, 71.2 with these settings, 69.0 with no collector at all;
the Celery workers' step processes went from 127 to 77 µs a turn (``bench/bench_celery.py``, two
worker processes, LSM shards).  So such a process:

* freezes what exists after start-up (``gc.freeze``): imported modules and the runtime's handles
  are never collected, and no pass looks at them again;
* collects the young generation every :data:`YOUNG_THRESHOLD` allocations instead of 700: reference
  cycles are still collected, only less often.
"""

from __future__ import annotations

import gc

#: Net allocations between young-generation passes (CPython's default: 700).
YOUNG_THRESHOLD = 50_000


def tune() -> None:
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
