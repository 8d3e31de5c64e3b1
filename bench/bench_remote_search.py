"""Latency of searches from the index files (``DATAMESH_INDEX_READS=files``) and through the search
workers (``workers``), in the same run.

    python bench/bench_remote_search.py [--conversations 200] [--rounds 5] [--queries 40]

Starts ``python -m datamesh worker --role all`` (one process: it serves the search queues too) on a
fresh data folder and PostgreSQL schema (:func:`bench.bench_remote_reads.workers_on_host_a`), ingests
``--conversations`` AlpacaEval turns and waits for the index, then runs ``--queries`` searches (six
words of a prompt each) ``--rounds`` times, one at a time, twice: by a reader on the workers' data
folder that opens the index files, and by one with an empty data folder whose searches go to the
search worker (``search.<region>``, answers in the result backend).  Reported per mode: ``p.search``
of one region and of every region (five asked at once), p50 / p99 / mean in milliseconds; the two
modes' hits are checked equal.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_ingest import load_rows, requests_for
from bench.bench_remote_reads import common_arguments, line, workers_on_host_a
from datamesh.core.config import DataMeshConfig
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.pipeline.search import SearchResult


async def measure(
    config: DataMeshConfig, queries: list[str], rounds: int
) -> tuple[dict[str, list[float]], list[object]]:
    """Milliseconds of each search, per kind (one region, every region), and the hits of the first round."""
    times: dict[str, list[float]] = {"search eu-west": [], "search all": []}
    hits: list[list[SearchResult]] = []
    async with (await IngestionPipeline.create(config)).unwrap() as p:
        (await p.search(queries[0], region="eu-west")).unwrap()  # warm-up: connections, the app, the index
        for n in range(rounds):
            for words in queries:
                for kind, region in (("search eu-west", "eu-west"), ("search all", None)):
                    started = time.perf_counter()
                    found = (await p.search(words, region=region, limit=10)).unwrap()
                    times[kind].append((time.perf_counter() - started) * 1000)
                    if n == 0:
                        hits.append(found)
    return times, list(hits)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_arguments(parser)
    parser.add_argument("--queries", type=int, default=40)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start")
    rows = load_rows()
    queries = [" ".join(prompt.decode().split()[:6]) for prompt, _ in rows[: args.queries]]
    async with workers_on_host_a(args.pg, args.broker, "sqlite") as (owners, root):
        async with (await IngestionPipeline.create(owners)).unwrap() as p:
            (await p.ingest_many(requests_for(rows, args.conversations))).unwrap()
            (await p.flush_index()).unwrap()  # the index worker drained the outbox
        remote = owners.with_changes(
            data_dir=root / "host-b", objects_url=owners.resolved_objects_url, ap_reads="workers", index_reads="workers"
        )
        print(f"{'index':8} {'call':14} {'p50 ms':>8} {'p99 ms':>8} {'mean ms':>8} {'calls':>7}")
        answers = []
        for mode, config in (("files", owners), ("workers", remote)):
            times, hits = await measure(config, queries, args.rounds)
            answers.append(hits)
            for kind, values in times.items():
                print(line(mode, kind, values), flush=True)
        assert answers[0] == answers[1], "the two modes' hits differ"
        print("hits identical in both modes")


if __name__ == "__main__":
    asyncio.run(main())
