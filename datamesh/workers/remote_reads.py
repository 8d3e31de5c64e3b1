"""AP shards read through their owners (``DATAMESH_AP_READS=workers``), for processes on any host.

A process that does not own the AP shards (the Celery-mode pipeline, the gateway, the CLI) gets a
:class:`~datamesh.storage.ap.store.ContentStore` whose engines (:func:`owner_reads_engine`) open no
file: each read of a shard is a ``read_ap`` task on ``ap-read.<region>.<shard>``, run by the worker
that owns the shard (:mod:`datamesh.tasks.reads`), and its answer comes back through Celery's result
backend (:mod:`datamesh.workers.replies`).  Such an engine never writes: the shard's owner is its
only writer.

A read waits ``DATAMESH_AP_READ_TIMEOUT_S`` for its answer; past it (no worker consumes the queue:
the owner is down, or its queue is not served) it fails with a retryable error naming the region,
the shard and the queue, and the message, sent with the same expiry, is dropped unread by an owner
that comes back later.  Failures here are :class:`~datamesh.storage.ap.base.ShardError`, which the
``ContentStore`` turns into ``StorageError`` like any engine's.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from datamesh.core.config import DataMeshConfig
from datamesh.storage.ap.base import PendingRead, ShardEngine, ShardError
from datamesh.storage.ap.store import EngineFactory, shard_address
from datamesh.tasks.codec import b64, unb64
from datamesh.tasks.reads import COUNT, GET, SCAN
from datamesh.workers import queues
from datamesh.workers.replies import NoAnswer, Replies, Reply


class OwnerReads:
    """This process's way to the shards' owners: ``read_ap`` tasks sent and answered through
    :class:`~datamesh.workers.replies.Replies`."""

    def __init__(self, config: DataMeshConfig) -> None:
        self.config = config
        self._replies = Replies(config)

    def ask(self, region: str, shard: int, op: str, **args: Any) -> Reply:
        """The owner's answer to one read of shard ``shard`` of ``region``; raises a retryable
        ``ShardError`` when no answer comes within the timeout or the broker cannot be reached."""
        answer, _ = self.send(region, shard, op, **args)
        return answer()

    def send(self, region: str, shard: int, op: str, **args: Any) -> tuple[Callable[[], Reply], Callable[[], None]]:
        """Send one read now: returns the wait for its answer (as :meth:`ask`, within the timeout
        from now) and the way to give it up."""
        where = f"shard {shard} of {region} (queue {queues.ap_read_queue(region, shard)})"
        what = f"a read of {where}"
        timeout = self.config.ap_read_timeout_s
        deadline = time.monotonic() + timeout
        try:
            sent = self._replies.send(
                queues.READ_AP, {"region": region, "shard": shard, "op": op, **args}, what=what, timeout=timeout
            )
        except NoAnswer as exc:
            raise ShardError(exc.message, retryable=exc.retryable) from exc

        def answer() -> Reply:
            try:
                return self._replies.wait(
                    sent,
                    what=what,
                    who=f"the owner of {where}",
                    hint="is the worker that owns it running?",
                    timeout=timeout,
                    deadline=deadline,
                )
            except NoAnswer as exc:
                raise ShardError(exc.message, retryable=exc.retryable) from exc

        return answer, lambda: self._replies.forget(sent)

    def close(self) -> None:
        self._replies.close()


class RemoteShard(ShardEngine):
    """One shard read through its owner; writes are refused (readers never write)."""

    def __init__(self, owners: OwnerReads, region: str, shard: int) -> None:
        self._owners = owners
        self.region = region
        self.shard = shard

    def put_many(self, items: Sequence[tuple[bytes, bytes]]) -> None:
        raise self._refused()

    def delete_many(self, keys: Sequence[bytes]) -> int:
        raise self._refused()

    def get_many(self, keys: Sequence[bytes]) -> Mapping[bytes, bytes]:
        return self.begin_get_many(keys).result()

    def begin_get_many(self, keys: Sequence[bytes]) -> PendingRead:
        """Send the read now: a reader of several shards has them all read at once."""
        answer, abandon = self._owners.send(self.region, self.shard, GET, keys=[b64(k) for k in keys])
        return PendingRead(lambda: {unb64(k): unb64(v) for k, v in answer()["found"].items()}, abandon)

    def scan_prefix(self, prefix: bytes, limit: int | None = None) -> Iterator[tuple[bytes, bytes]]:
        reply = self._owners.ask(self.region, self.shard, SCAN, prefix=b64(prefix), limit=limit)
        return iter([(unb64(k), unb64(v)) for k, v in reply["items"]])

    def count(self) -> int:
        return int(self._owners.ask(self.region, self.shard, COUNT)["count"])

    def close(self) -> None:
        self._owners.close()  # idempotent; a later read builds the app again

    def _refused(self) -> ShardError:
        return ShardError(
            f"shard {self.shard} of {self.region} is read through its owner (DATAMESH_AP_READS=workers):"
            f" this process does not write it; its writes go to queue {queues.ap_queue(self.region, self.shard)}"
        )


def owner_reads_engine(config: DataMeshConfig) -> EngineFactory:
    """An engine factory for ``ContentStore`` whose shards are read through their owners."""
    owners = OwnerReads(config)

    def factory(path: Path) -> ShardEngine:
        region, shard = shard_address(path)
        return RemoteShard(owners, region, shard)

    return factory
