"""A second process for the observability tests (run as ``python -m tests.obs_child MODE ...``).

``serve N``   ingest N real turns (the third batch fails at write_ap), serve /metrics on a free port,
              print ``PORT <n>``, exit when stdin closes.
``ingest TRACEPARENT [FAIL_STEP]``  continue the trace carried by TRACEPARENT, ingest one real
              turn (failing at FAIL_STEP if given), flush the spans (``DATAMESH_TRACE_FILE``) and
              exit 0 (ok) or 3 (the ingest failed).

Configuration comes from ``DATAMESH_*`` variables, as in production.
"""

from __future__ import annotations

import asyncio
import sys

from datamesh import observability
from datamesh.core.config import DataMeshConfig
from datamesh.observability import metrics, tracing
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.pipeline.saga import InjectedFault
from tests.helpers import real_requests


def fail_at(step: str | None) -> object:
    def hook(current: str, phase: str) -> None:
        if step is not None and current == step and phase == "before":
            raise InjectedFault(f"injected at {step}")

    return hook


async def serve(config: DataMeshConfig, n: int) -> int:
    armed = {"step": ""}

    def hook(step: str, phase: str) -> None:
        if step == armed["step"] and phase == "before":
            raise InjectedFault("injected")

    async with (await IngestionPipeline.create(config, faults=hook)).unwrap() as p:
        for batch in range(3):
            armed["step"] = "write_ap" if batch == 2 else ""
            (await p.ingest_many(real_requests(n))).unwrap()
        server, _ = metrics.serve(0, addr="127.0.0.1")
        print(f"PORT {server.server_port}", flush=True)
        await asyncio.to_thread(sys.stdin.read)
        server.shutdown()
    return 0


async def ingest(config: DataMeshConfig, traceparent: str, step: str | None) -> int:
    with tracing.continued({"traceparent": traceparent}, "child.task", **{"datamesh.step": "ingest"}):
        async with (await IngestionPipeline.create(config, faults=fail_at(step))).unwrap() as p:  # type: ignore[arg-type]
            result = await p.ingest(real_requests(1)[0])
            if result.is_err():
                tracing.set_error("ingest failed")
    tracing.shutdown()
    return 0 if result.is_ok() else 3


def main() -> int:
    config = DataMeshConfig.from_env().unwrap()
    observability.configure(config)
    if sys.argv[1] == "serve":
        return asyncio.run(serve(config, int(sys.argv[2])))
    return asyncio.run(ingest(config, sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None))


if __name__ == "__main__":
    sys.exit(main())
