"""Per-process state of a worker: the tiers, the shard leases, the Redis client, the fault hook.

Everything is opened lazily in the process that uses it: a prefork child must not reuse the parent's
database sockets (``after_fork`` disposes the CP engine's pool for that reason) nor its shard locks.
"""

from __future__ import annotations

import contextlib
import os
import socket
from dataclasses import dataclass, field

import redis

from datamesh.core.config import DataMeshConfig
from datamesh.pipeline.saga import FaultHook, _no_faults
from datamesh.pipeline.tiers import Tiers
from datamesh.storage.ap.fenced import fenced_engine, read_fence
from datamesh.storage.ap.store import default_engine
from datamesh.workers.leases import ShardLeases

DONE_KEY = "dm:saga-done:{}"
_DONE_TTL_S = 3600


@dataclass(slots=True)
class Runtime:
    config: DataMeshConfig = field(default_factory=DataMeshConfig)
    node: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}")
    faults: FaultHook = _no_faults
    _tiers: Tiers | None = None
    _redis: redis.Redis | None = None
    _leases: ShardLeases | None = None

    def configure(self, config: DataMeshConfig) -> None:
        self.close()
        self.config = config

    def tiers(self) -> Tiers:
        if self._tiers is None:
            opened = Tiers.open(self.config, engine_factory=fenced_engine(self.token, default_engine))
            self._tiers = opened.unwrap()
        return self._tiers

    def redis(self) -> redis.Redis:
        if self._redis is None:
            self._redis = redis.Redis.from_url(self.config.broker_url, socket_timeout=10)
        return self._redis

    def leases(self) -> ShardLeases:
        if self._leases is None:
            self._leases = ShardLeases(
                self.redis(), self.node, ttl_s=self.config.shard_lease_s, fence_of=self._fence_of
            )
        return self._leases

    def token(self, region: str, shard: int) -> int | None:
        return self.leases().token(region, shard)

    def serves(self, region: str) -> bool:
        """Residency: a worker started for some regions writes only their content."""
        return not self.config.worker_regions or region in self.config.worker_regions

    def notify(self, saga_id: str, status: str) -> None:
        """Wake a caller waiting for the saga (a hint only: the saga log in CP is the record)."""
        try:
            key = DONE_KEY.format(saga_id)
            pipe = self.redis().pipeline()
            pipe.lpush(key, status)
            pipe.expire(key, _DONE_TTL_S)
            pipe.execute()
        except redis.RedisError:
            pass  # the caller falls back to polling the saga log

    def after_fork(self) -> None:
        """In a new child: drop connections inherited from the parent without closing the parent's."""
        if self._tiers is not None:
            self._tiers.cp.engine.dispose(close=False)
            self._tiers = None
        self._redis = None
        self._leases = None

    def close(self) -> None:
        if self._leases is not None:
            with contextlib.suppress(redis.RedisError):
                self._leases.release_all()
        if self._tiers is not None:
            self._tiers.close()
        self._tiers = None
        self._leases = None
        self._redis = None

    def _fence_of(self, region: str, shard: int) -> int:
        return read_fence(self.tiers().ap.shard_path_for(region, shard).with_suffix(".fence"))


#: The worker process's runtime (configured by the Celery app; tasks read it).
RUNTIME = Runtime()
