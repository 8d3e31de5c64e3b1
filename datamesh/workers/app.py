"""The Celery application: ``celery -A datamesh.workers.app worker ...``.

:func:`create_app` builds the app from a :class:`DataMeshConfig`.  The reliability settings are in
:func:`reliability_settings`, each with its reason, and nothing overrides them.  Deployment settings
(broker, result backend, queues, routes, beat) are computed from the configuration
(:func:`deployment_settings`); when :mod:`celeryconfig` at the top of the repository is importable
(a checkout, the docker image), the Celery processes (workers, beat, Flower) apply the settings it
defines over the computed ones, but a setting the callers share (:data:`SHARED_SETTINGS`: the broker,
the queues, the routes) must be what the configuration computes: the callers never read the file.
"""

from __future__ import annotations

import importlib
from typing import Any

from celery import Celery
from celery.signals import beat_embedded_init, celeryd_init, worker_process_init, worker_process_shutdown
from kombu.entity import Queue
from kombu.utils.url import maybe_sanitize_url

from datamesh.core import gc_tuning
from datamesh.core.config import DataMeshConfig
from datamesh.core.errors import ConfigError, describe
from datamesh.core.result import Err, Ok, Result
from datamesh.core.types import GeoRegion
from datamesh.workers import orphans, queues, telemetry
from datamesh.workers.runtime import RUNTIME

#: Every task module: every worker imports all of them, whatever queues it consumes, so an errback
#: or a compensation published by any worker is known to every other (a worker that does not know
#: a task name rejects the message).
TASK_MODULES = (
    "datamesh.tasks.steps",
    "datamesh.tasks.compensation",
    "datamesh.tasks.reaper",
    "datamesh.tasks.index",
    "datamesh.tasks.erasure",
    "datamesh.tasks.reads",
    "datamesh.tasks.search",
)


#: How long a result stays in the backend when nobody deletes it (a read's or a search's answer that
#: came after its reader gave up); longer than any read or search timeout worth setting.
RESULT_EXPIRES_S = 60


def reliability_settings(config: DataMeshConfig) -> dict[str, Any]:
    """The settings that decide whether work is lost or duplicated; one place, one reason each."""
    # The longest a step can take with its retries: the hard time limit, plus a backoff of up to 2 s
    # before each retry, plus a shard whose owner died waiting for the lease to expire.
    longest_step_s = config.step_time_limit_s + config.step_max_deliveries * 2.0 + config.shard_lease_s
    if config.visibility_timeout_s <= longest_step_s:
        raise ValueError(
            f"DATAMESH_VISIBILITY_TIMEOUT_S={config.visibility_timeout_s} must exceed the longest step "
            f"with its retries ({longest_step_s:.0f}s), or Redis redelivers steps that are still running"
        )
    return {
        # Acknowledge a message only after its task ran: a worker dying mid-step leaves the message to
        # be delivered again, which is harmless because every step is idempotent per (saga, step).
        "task_acks_late": True,
        # A child killed by a signal or the OOM killer requeues its message instead of failing it
        # (a kill fires no errback).  Our own cap, DATAMESH_STEP_MAX_DELIVERIES counted per saga step
        # in saga_steps.attempts, stops a message that kills every worker from looping for ever.
        "task_reject_on_worker_lost": True,
        # A step that raised has been handled: its errback recorded the failure and enqueued the
        # compensation, so the message is acknowledged rather than redelivered.
        "task_acks_on_failure_or_timeout": True,
        # Writers reserve one message at a time: a prefetched batch waits behind a slow step, and a
        # shard's messages held by a worker that dies wait for the visibility timeout.
        "worker_prefetch_multiplier": 1,
        # Redis redelivers an unacknowledged message after this long: it must exceed the longest step
        # with its retries (checked above), or a step still running is run a second time in parallel.
        # ``priority_steps``: datamesh sends no task priorities, so each queue is one Redis list, not
        # kombu's default four (one per priority step): a worker's BRPOP, sent again after every
        # message it takes, names a quarter as many keys (an ``all`` worker listens on ~60 queues).
        "broker_transport_options": {"visibility_timeout": config.visibility_timeout_s, "priority_steps": [0]},
        # A task running when the broker connection drops cannot acknowledge its message any more; it
        # will be redelivered, so cancel it rather than finish it twice.
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # A step that hangs is killed after this long and fails (its errback compensates the saga):
        # this bounds "the longest step" that the visibility timeout must exceed.
        "task_time_limit": config.step_time_limit_s,
        # Celery results are never the record: the saga log in the CP tier is.  The two tasks that
        # store a result, ``read_ap`` and ``query_index`` (reads routed to a shard's owner, to a
        # region's search workers), hold turn content in it: their reader deletes it once read, and
        # one it gave up on expires within a minute.
        "task_ignore_result": True,
        "result_expires": RESULT_EXPIRES_S,
        # JSON only (payload bytes travel base64): no pickle from the broker.
        "task_serializer": "json",
        "accept_content": ["json"],
        # Retry publishing through a broker blip; a publish that still fails is an error to the caller.
        "task_publish_retry": True,
        "broker_connection_retry_on_startup": True,
        # Events let Flower show the pools and the saga tasks.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_create_missing_queues": True,
    }


def deployment_settings(config: DataMeshConfig) -> dict[str, Any]:
    """Broker, result backend, queues, routes, the reaper's and the index drains' schedules, from the configuration."""
    return {
        "broker_url": config.broker_url,
        "result_backend": config.resolved_result_backend,
        "task_default_queue": queues.CP_QUEUE,
        "task_queues": [Queue(name) for name in queues.all_queues(config.ap_shards)],
        "task_routes": (queues.route,),
        "beat_schedule": {
            "reap-expired-sagas": {
                "task": queues.REAP,
                "schedule": config.reap_interval_s,
                "options": {"queue": queues.REAPER_QUEUE, "expires": config.reap_interval_s},
            },
            # Index work never depends on one message: every region's outbox is drained periodically.
            **{
                f"drain-index-{region.value}": {
                    "task": queues.INDEX_DRAIN,
                    "schedule": config.index_interval_s,
                    "kwargs": {"region": region.value},
                    "options": {"queue": queues.index_queue(region.value), "expires": config.index_interval_s},
                }
                for region in GeoRegion
            },
        },
    }


def create_app(config: DataMeshConfig, *, load_celeryconfig: bool = True) -> Celery:
    """The datamesh Celery app; ``load_celeryconfig`` applies the deployment file (the Celery processes).

    Raises ``ValueError`` for an unsafe visibility timeout or a deployment file that sets a shared
    setting (:data:`SHARED_SETTINGS`) to something the configuration does not compute.
    """
    app = Celery("datamesh", include=list(TASK_MODULES))
    app.conf.update(deployment_settings(config))
    if load_celeryconfig:
        loaded = deployment_file_settings(app)
        if isinstance(loaded, Err):
            raise ValueError(describe(loaded.error))
        app.conf.update(loaded.value)  # the file's settings win over the defaults
    app.conf.update(reliability_settings(config))  # never overridden by a deployment file
    app.conf.imports = list(TASK_MODULES)
    RUNTIME.configure(config)
    return app


#: The deployment settings that the processes which never load ``celeryconfig`` read too, with the
#: configuration they come from.  The pipeline's executor (the gateway, ``ingest``), the CLI
#: (``sagas retry``, ``reap``) and every Redis client of datamesh (payload stashes, shard leases, the
#: waiters' wake-ups) take the broker from DATAMESH_BROKER_URL; the queues and routes decide where
#: both sides publish and what the workers consume (``-Q`` is computed too); readers of AP shards
#: wait for their owners' answers in the result backend (``DATAMESH_AP_READS=workers``).  A file that moved one
#: of these for the Celery processes alone would split the system: workers on one broker or queue,
#: callers on another, and sagas waiting for messages nobody receives.
SHARED_SETTINGS = {
    "broker_url": "DATAMESH_BROKER_URL",
    "broker_read_url": "DATAMESH_BROKER_URL",
    "broker_write_url": "DATAMESH_BROKER_URL",
    "result_backend": "DATAMESH_RESULT_BACKEND",
    "task_queues": "DATAMESH_AP_SHARDS",
    "task_default_queue": "datamesh.workers.queues",
    "task_routes": "datamesh.workers.queues",
}


def deployment_file_settings(app: Celery, module: str = "celeryconfig") -> Result[dict[str, Any], ConfigError]:
    """The Celery settings ``module`` defines (none when it is not importable), or the first shared
    setting it sets to something other than ``app`` computed (``Err`` naming both values).

    Applied as changes, not with ``config_from_object``: Celery ranks a configuration object below
    every ``conf.update``, so the file would never win over the settings computed here.  A shared
    setting equal to the computed one (the file as shipped before, a copy of it) is accepted.
    """
    try:
        loaded = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise  # the file exists but imports something missing: say so, do not run without it
        return Ok({})
    known = set(app.conf.keys())
    settings = {name: value for name, value in vars(loaded).items() if name in known}
    for name, source in SHARED_SETTINGS.items():
        if name in settings and settings[name] != app.conf[name]:
            return Err(_shared_setting_moved(module, name, source, settings[name], app.conf[name]))
    return Ok(settings)


def _shared_setting_moved(module: str, name: str, source: str, wanted: Any, computed: Any) -> ConfigError:
    if source in ("DATAMESH_BROKER_URL", "DATAMESH_RESULT_BACKEND"):
        shown_wanted, shown_computed = maybe_sanitize_url(wanted), maybe_sanitize_url(computed)
        fix = f"set {source} for every process (workers, beat, Flower, gateway, CLI) and remove {name} from it"
    else:
        shown_wanted, shown_computed = _shown(wanted), _shown(computed)
        fix = f"remove {name} from it (it comes from {source} in every process)"
    return ConfigError(
        source if source.startswith("DATAMESH_") else f"{module}.{name}",
        f"{module}.{name} is {shown_wanted!r} but {source} gives {shown_computed!r}; only the Celery"
        f" processes read {module}.py, so the callers would use the other value: {fix}",
    )


def _shown(value: Any) -> Any:
    """Queues by name (their reprs say little and are long)."""
    if isinstance(value, list | tuple) and value and all(isinstance(q, Queue) for q in value):
        return [q.name for q in value]
    return value


@celeryd_init.connect
def _name_node(sender: str | None = None, **_: Any) -> None:
    # The lease owner is the worker node: a child restarted after a kill keeps the node's shards.
    if sender:
        RUNTIME.node = sender
    orphans.record_main_process()  # before any fork: an embedded beat checks its parent against it


@beat_embedded_init.connect
def _beat_dies_with_worker(**_: Any) -> None:
    # worker --beat: a beat left running by a killed worker would publish for ever (orphans.py).
    orphans.exit_with_parent()


@worker_process_init.connect
def _after_fork(**_: Any) -> None:
    # engine.dispose() after fork: the child must not share the parent's pooled DB connections.
    RUNTIME.after_fork()
    # Each pool process has its own tracer, exporter thread and log handler (service name "worker"):
    # the task spans continue the trace context carried in the message headers (telemetry.py).
    telemetry.after_fork(RUNTIME.config)
    gc_tuning.tune()  # last: what the set-up above made is frozen with the imports


@worker_process_shutdown.connect
def _on_shutdown(**_: Any) -> None:
    RUNTIME.close()
    telemetry.on_process_shutdown()  # flush kept spans; multiprocess metrics: mark this pid dead


def _default_app() -> Celery:
    config = DataMeshConfig.from_env()
    if config.is_err():
        raise SystemExit(f"error: {config.error}")
    try:
        return create_app(config.unwrap())
    except ValueError as exc:  # an unsafe visibility timeout, a deployment file moving a shared setting
        raise SystemExit(f"error: {exc}") from exc


def __getattr__(name: str) -> Celery:
    """``app`` (what ``celery -A datamesh.workers.app`` loads) is built from the environment on first use.

    Importing this module does not read the environment: the pipeline builds its own app from the
    configuration it was given.
    """
    if name in ("app", "celery"):
        built = _default_app()
        globals()["app"] = globals()["celery"] = built
        return built
    raise AttributeError(name)
