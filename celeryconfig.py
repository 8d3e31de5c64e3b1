"""Deployment settings of the datamesh Celery app, read from the environment (``DATAMESH_*``).

``celery -A datamesh.workers.app`` (workers, beat, Flower) and ``python -m datamesh serve`` load this
module when it is importable (a checkout, the docker image): every Celery setting defined here
replaces the one datamesh computes.  As shipped it defines exactly what
``datamesh.workers.app.deployment_settings`` computes from the environment; edit it, or set the
variables, to point a deployment at its broker.  The reliability settings (acks_late,
reject_on_worker_lost, prefetch, visibility timeout) are not here: they live with their reasons in
``datamesh.workers.app.reliability_settings`` and a deployment cannot weaken them.
"""

from __future__ import annotations

from datamesh.core.config import DataMeshConfig
from datamesh.workers.app import deployment_settings

_settings = deployment_settings(DataMeshConfig.from_env().unwrap())

#: DATAMESH_BROKER_URL: Redis with AOF on and ``maxmemory-policy noeviction`` in production.
broker_url = _settings["broker_url"]
#: DATAMESH_RESULT_BACKEND: empty by default; results are never the record (the saga log is).
result_backend = _settings["result_backend"]
#: Every queue: ``cp``, ``blobs.<region>``, ``ap.<region>.<shard>`` (DATAMESH_AP_SHARDS per region),
#: ``index.<region>``.
task_queues = _settings["task_queues"]
task_default_queue = _settings["task_default_queue"]
#: Routing by task name, region and shard (``datamesh.workers.queues.route``).
task_routes = _settings["task_routes"]
#: Celery beat runs the reaper every DATAMESH_REAP_INTERVAL_S and drains every region's index
#: outbox every DATAMESH_INDEX_INTERVAL_S.
beat_schedule = _settings["beat_schedule"]
