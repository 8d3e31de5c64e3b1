"""Deployment settings of the datamesh Celery processes (workers, beat, Flower), read from the environment.

``celery -A datamesh.workers.app`` (what ``python -m datamesh worker | beat | flower`` run) loads this
module when it is importable (a checkout, the docker image): every Celery setting defined here
replaces the one datamesh computes, in those processes only.  The gateway, ``ingest``, the CLI and
every Redis client of datamesh (payload stashes, shard leases) never read it.

So the broker, the result backend, the queues and the routes are not set here: every process takes
them from the same place, the ``DATAMESH_*`` variables (the broker from ``DATAMESH_BROKER_URL``, the
queues from ``DATAMESH_AP_SHARDS``, the result backend, which carries the answers of reads routed to
the AP shards' owners, from ``DATAMESH_RESULT_BACKEND``).  To point a deployment at its broker, set
``DATAMESH_BROKER_URL`` for every process.  A ``broker_url`` (or ``broker_read_url``,
``broker_write_url``, ``result_backend``, ``task_queues``, ``task_default_queue``, ``task_routes``)
added here that differs from what the variables give is refused when the Celery app is built (a
configuration error naming both values), rather than splitting workers and callers across two
brokers (``datamesh.workers.app.SHARED_SETTINGS``).

What may be set here is what only the Celery processes use: the settings below, and any other Celery
setting that is not a reliability one.  The reliability settings (acks_late, reject_on_worker_lost,
prefetch, visibility timeout) are not here: they live with their reasons in
``datamesh.workers.app.reliability_settings`` and a deployment cannot weaken them.
"""

from __future__ import annotations

from datamesh.core.config import DataMeshConfig
from datamesh.workers.app import deployment_settings

_settings = deployment_settings(DataMeshConfig.from_env().unwrap())

#: Celery beat runs the reaper every DATAMESH_REAP_INTERVAL_S and drains every region's index
#: outbox every DATAMESH_INDEX_INTERVAL_S.
beat_schedule = _settings["beat_schedule"]
