"""Deployment settings of the datamesh Celery app, read from the environment (``DATAMESH_*``).

``datamesh.workers.app`` loads this module when it is importable (a checkout, the docker image);
edit it, or set the variables, to point a deployment at its broker.  The reliability settings
(acks_late, reject_on_worker_lost, prefetch, visibility timeout) are not here: they live with their
reasons in ``datamesh.workers.app.reliability_settings`` and a deployment cannot weaken them.
"""

from __future__ import annotations

from kombu.entity import Queue

from datamesh.core.config import DataMeshConfig
from datamesh.workers import queues

_config = DataMeshConfig.from_env().unwrap()

#: DATAMESH_BROKER_URL: Redis with AOF on and ``maxmemory-policy noeviction`` in production.
broker_url = _config.broker_url
#: DATAMESH_RESULT_BACKEND: empty by default; results are never the record (the saga log is).
result_backend = _config.result_backend or None
#: Every queue: ``cp``, ``blobs.<region>``, ``ap.<region>.<shard>`` for every region and shard.
task_queues = [Queue(name) for name in queues.all_queues(_config.ap_shards)]
task_default_queue = queues.CP_QUEUE
#: Routing by task name, region and shard (``datamesh.workers.queues.route``).
task_routes = (queues.route,)
#: Celery beat runs the reaper every DATAMESH_REAP_INTERVAL_S.
beat_schedule = {
    "reap-expired-sagas": {
        "task": queues.REAP,
        "schedule": _config.reap_interval_s,
        "options": {"queue": queues.CP_QUEUE, "expires": _config.reap_interval_s},
    }
}
