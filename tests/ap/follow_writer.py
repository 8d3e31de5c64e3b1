"""Child process of the cross-process reader test: the shard's one writer, driven over stdin/stdout.

Run as ``python follow_writer.py <shard_dir>``.  It writes batches ``0 .. FLUSHED - 1`` (of
:func:`crash_writer.batch_items`), flushing after each, and prints ``flushed``; on ``go`` from
stdin it writes batch ``FLUSHED`` without flushing and prints ``acked <b>``, then keeps writing one
batch at a time (printing ``acked <b>`` after each) until ``stop``, when it closes the shard and
prints ``closed``.  Only the flusher's age rule (``FOLLOW_OPTIONS["flush_interval_s"]``) publishes
the batches written after ``go``; compactions (fanout 2) replace runs while the reader reads.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

FLUSHED = 8
FOLLOW_OPTIONS = {"memtable_bytes": 1 << 30, "tier_fanout": 2, "block_entries": 32, "flush_interval_s": 0.5}


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from crash_writer import batch_items

    from datamesh.storage.ap.lsm import LsmShard

    shard = LsmShard(Path(sys.argv[1]), **FOLLOW_OPTIONS)  # type: ignore[arg-type]
    for batch in range(FLUSHED):
        shard.put_many(batch_items(batch))
        shard.flush()
    print("flushed", flush=True)
    go, stop = threading.Event(), threading.Event()

    def commands() -> None:
        for line in sys.stdin:
            {"go": go, "stop": stop}[line.strip()].set()
        stop.set()  # the parent went away

    threading.Thread(target=commands, daemon=True).start()
    go.wait()
    batch = FLUSHED
    while not stop.is_set():
        shard.put_many(batch_items(batch))
        print(f"acked {batch}", flush=True)
        batch += 1
        stop.wait(0.02)
    shard.close()
    print("closed", flush=True)


if __name__ == "__main__":
    main()
