"""Ingest throughput with metrics, tracing and logging on versus off, in the same run.

    python bench/bench_observability.py [--rounds 3] [--single 150] [--batch 100] [--batches 6]

One local-mode pipeline (SQLite CP, AP shards, filesystem objects) on the AlpacaEval data; rounds
alternate *off* and *on* (swapping which goes first) so drift and neighbours' load hit both alike.

* off: ``DATAMESH_METRICS=off``, no tracer, no log handler (the data path's checks only).
* on:  metrics on; tracing on with tail sampling at the default rate (0.01) exporting kept spans to
  a JSON-lines file; JSON logs at INFO to a file, sampled like traces.

Each round ingests fresh entities, so nothing is deduplicated.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ingest import load_rows, requests_for

from datamesh.core.config import DEFAULT_TRACE_SAMPLE_RATE, DataMeshConfig
from datamesh.observability import logs, metrics, tracing
from datamesh.pipeline.ingestion import IngestionPipeline


def observability(on: bool, root: Path) -> logging.Handler | None:
    metrics.set_enabled(on)
    tracing.shutdown()
    datamesh_logger = logging.getLogger("datamesh")
    for h in list(datamesh_logger.handlers):
        datamesh_logger.removeHandler(h)
    if not on:
        datamesh_logger.setLevel(logging.WARNING)
        return None
    tracing.setup(service_name="bench", sample_rate=DEFAULT_TRACE_SAMPLE_RATE, trace_file=root / "spans.jsonl")
    stream = (root / "log.jsonl").open("a", encoding="utf-8")
    return logs.install(level="INFO", sample_rate=DEFAULT_TRACE_SAMPLE_RATE, stream=stream)


async def measure(
    p: IngestionPipeline, rows: list[tuple[bytes, bytes]], single: int, batch: int, batches: int
) -> tuple[float, float]:
    reqs = requests_for(rows, single)
    t0 = time.perf_counter()
    for r in reqs:
        (await p.ingest(r)).unwrap()
    single_rate = single / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for _ in range(batches):
        done = (await p.ingest_many(requests_for(rows, batch))).unwrap()
        assert all(d.is_ok() for d in done)
    batch_rate = batch * batches / (time.perf_counter() - t0)
    return single_rate, batch_rate


async def run(args: argparse.Namespace) -> None:
    rows = load_rows()
    print(f"data: {len(rows)} AlpacaEval turns; rounds={args.rounds} single={args.single} "
          f"batch={args.batch}x{args.batches}")  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    with tempfile.TemporaryDirectory(prefix="datamesh-bench-obs-") as tmp:
        root = Path(tmp)
        config = DataMeshConfig(data_dir=root / "data", ingest_rate=1e9, ingest_burst=10**9)
        async with (await IngestionPipeline.create(config)).unwrap() as p:
            observability(False, root)
            await measure(p, rows, 20, 20, 1)  # warm up
            for round_no in range(args.rounds):
                for mode in ("off", "on") if round_no % 2 == 0 else ("on", "off"):
                    handler = observability(mode == "on", root)
                    results[mode].append(await measure(p, rows, args.single, args.batch, args.batches))
                    if handler is not None:
                        handler.flush()
        observability(False, root)
        spans = sum(1 for _ in (root / "spans.jsonl").open()) if (root / "spans.jsonl").exists() else 0
        log_lines = sum(1 for _ in (root / "log.jsonl").open()) if (root / "log.jsonl").exists() else 0
    print(f"{'mode':6} {'ingest() turns/s':>18} {'ingest_many turns/s':>21}   (median of rounds; each round)")
    med = {}
    for mode, values in results.items():
        s = statistics.median(v[0] for v in values)
        b = statistics.median(v[1] for v in values)
        med[mode] = (s, b)
        each = "  ".join(f"{x:.0f}/{y:.0f}" for x, y in values)
        print(f"{mode:6} {s:18.0f} {b:21.0f}   {each}")
    print(f"ratio on/off: ingest() {med['on'][0] / med['off'][0]:.3f}, ingest_many {med['on'][1] / med['off'][1]:.3f}")
    print(f"exported spans (sampled traces) {spans}, log lines {log_lines}")
    print(f"load average during the run: {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--single", type=int, default=150, help="ingest() calls per round and mode")
    parser.add_argument("--batch", type=int, default=100, help="ingest_many batch size")
    parser.add_argument("--batches", type=int, default=6, help="ingest_many calls per round and mode")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
