"""Celery configuration that needs no running service: variables, routing, the worker command lines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from datamesh.cli.main import build_parser
from datamesh.core import gc_tuning
from datamesh.core.config import DataMeshConfig, parse_shards
from datamesh.core.errors import ConfigError
from datamesh.core.result import Err, Result
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.pipeline.tiers import Tiers
from datamesh.workers import app as app_module
from datamesh.workers import queues
from datamesh.workers.app import create_app, deployment_settings
from datamesh.workers.cli import worker_commands

ROOT = Path(__file__).resolve().parents[1]


def test_celery_variables_parse() -> None:
    config = DataMeshConfig.from_env(
        {"DATAMESH_EXECUTOR": "celery", "DATAMESH_WORKER_SHARDS": "0-2,7", "DATAMESH_WORKER_REGIONS": "eu-west"}
    ).unwrap()
    assert config.executor == "celery" and config.worker_shards == (0, 1, 2, 7)
    assert config.worker_regions == ("eu-west",) and config.broker_url == "redis://127.0.0.1:6379/0"
    bad = DataMeshConfig.from_env({"DATAMESH_WORKER_REGIONS": "mars"})
    assert isinstance(bad, Err) and bad.error.variable == "DATAMESH_WORKER_REGIONS"
    assert parse_shards("3") == (3,)


def test_the_saga_queue_timeout_is_a_positive_number_no_shorter_than_the_lease() -> None:
    # Given no setting, the queue timeout is ten minutes (the running lease one),
    default = DataMeshConfig.from_env({}).unwrap()
    assert (default.saga_queue_timeout_s, default.saga_lease_s) == (600.0, 60.0)
    assert DataMeshConfig.from_env({"DATAMESH_SAGA_QUEUE_TIMEOUT_S": "90"}).unwrap().saga_queue_timeout_s == 90.0
    # a value that is not a positive number is refused, naming the variable,
    for raw in ("0", "-5", "soon", "inf"):
        bad = DataMeshConfig.from_env({"DATAMESH_SAGA_QUEUE_TIMEOUT_S": raw})
        assert isinstance(bad, Err) and bad.error.variable == "DATAMESH_SAGA_QUEUE_TIMEOUT_S", raw
        assert raw in bad.error.message
    # and so is one shorter than the running lease, from the environment or in a configuration object.
    short = DataMeshConfig.from_env({"DATAMESH_SAGA_LEASE_S": "120", "DATAMESH_SAGA_QUEUE_TIMEOUT_S": "60"})
    assert isinstance(short, Err) and short.error.variable == "DATAMESH_SAGA_QUEUE_TIMEOUT_S"
    assert "DATAMESH_SAGA_LEASE_S" in short.error.message
    assert DataMeshConfig.from_env({"DATAMESH_SAGA_LEASE_S": "60", "DATAMESH_SAGA_QUEUE_TIMEOUT_S": "60"}).is_ok()


def test_tiers_refuse_a_queue_timeout_shorter_than_the_lease(tmp_path: Path) -> None:
    config = DataMeshConfig(data_dir=tmp_path, saga_lease_s=30.0, saga_queue_timeout_s=10.0)
    opened = Tiers.open(config)
    assert isinstance(opened, Err) and isinstance(opened.error, ConfigError)
    assert opened.error.variable == "DATAMESH_SAGA_QUEUE_TIMEOUT_S"


def test_reliability_settings_are_set_and_the_visibility_timeout_checked(tmp_path: Path) -> None:
    app = create_app(DataMeshConfig(), load_celeryconfig=False)
    conf = app.conf
    assert conf.task_acks_late and conf.task_reject_on_worker_lost and conf.worker_prefetch_multiplier == 1
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit
    assert set(conf.imports) == {
        "datamesh.tasks.steps",
        "datamesh.tasks.compensation",
        "datamesh.tasks.reaper",
        "datamesh.tasks.index",
        "datamesh.tasks.erasure",
        "datamesh.tasks.reads",
        "datamesh.tasks.search",
    }


def test_a_deployment_file_overrides_the_computed_settings_but_not_the_reliability_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a deployment file that moves settings only the Celery processes use, and tries to weaken acks
    (tmp_path / "site_celery.py").write_text(
        "worker_max_memory_per_child = 200000\n"
        "worker_max_tasks_per_child = 100\n"
        "task_acks_late = False\n"
        "not_a_celery_setting = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(app_module, "deployment_file_settings", _loading("site_celery"))
    # When the app is built from a configuration that says otherwise
    conf = create_app(DataMeshConfig(broker_url="redis://127.0.0.1:6379/0")).conf
    # Then the file's deployment settings win, the reliability settings do not move
    assert conf.worker_max_memory_per_child == 200000 and conf.worker_max_tasks_per_child == 100
    assert conf.task_acks_late is True and "not_a_celery_setting" not in conf
    assert conf.broker_url == "redis://127.0.0.1:6379/0"


def test_a_deployment_file_cannot_move_the_broker_or_the_queues_the_callers_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(tmp_path))
    config = DataMeshConfig(broker_url="redis://:secret@queue.example:6379/2")
    computed = create_app(config, load_celeryconfig=False)
    file_settings = app_module.deployment_file_settings  # the real one (create_app's is patched below)
    # Given a deployment file that points the workers at another broker than DATAMESH_BROKER_URL
    # (which the executor, the CLI and the stash and lease Redis clients use: they never read the file),
    (tmp_path / "moved_broker.py").write_text("broker_url = 'redis://:hunter2@other.example:6380/4'\n")
    # when the Celery app is built with it,
    loaded = file_settings(computed, "moved_broker")
    # then it is a configuration error naming both brokers (passwords masked) and the variable to set,
    assert isinstance(loaded, Err) and loaded.error.variable == "DATAMESH_BROKER_URL"
    message = loaded.error.message
    assert "moved_broker.broker_url" in message and "redis://:**@other.example:6380/4" in message
    assert "redis://:**@queue.example:6379/2" in message and "secret" not in message and "hunter2" not in message
    monkeypatch.setattr(app_module, "deployment_file_settings", _loading("moved_broker"))
    with pytest.raises(ValueError, match="configuration error in DATAMESH_BROKER_URL"):
        create_app(config)
    # and so is a read or write broker, or queues and routes the callers would not publish to;
    moved = {
        "broker_read_url": "broker_read_url = 'redis://other.example:6380/4'",
        "broker_write_url": "broker_write_url = 'redis://other.example:6380/4'",
        "task_default_queue": "task_default_queue = 'elsewhere'",
        "task_queues": "from kombu import Queue\ntask_queues = [Queue('cp')]",
        "task_routes": "task_routes = ({'datamesh.commit_cp': {'queue': 'elsewhere'}},)",
        "result_backend": "result_backend = 'redis://results.example:6380/4'",  # readers wait there
    }
    for n, (setting, text) in enumerate(moved.items()):
        (tmp_path / f"moved_{n}.py").write_text(text + "\n")
        refused = file_settings(computed, f"moved_{n}")
        assert isinstance(refused, Err) and f"moved_{n}.{setting} is" in refused.error.message, (setting, refused)
    assert "['cp']" in file_settings(computed, "moved_3").unwrap_err().message
    # a file that repeats what the variables give (the file as shipped before) is accepted.
    (tmp_path / "same_broker.py").write_text(
        "broker_url = 'redis://:secret@queue.example:6379/2'\ntask_default_queue = 'cp'\n"
    )
    assert file_settings(computed, "same_broker").unwrap() == {
        "broker_url": "redis://:secret@queue.example:6379/2",
        "task_default_queue": "cp",
    }


def test_a_worker_whose_celeryconfig_moves_the_broker_refuses_to_start(tmp_path: Path) -> None:
    # Given a celeryconfig.py (the first on the worker's path) that sets another broker than DATAMESH_BROKER_URL,
    (tmp_path / "celeryconfig.py").write_text("broker_url = 'redis://127.0.0.1:1/9'\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAMESH_")}
    env.update(PYTHONPATH=str(ROOT), DATAMESH_EXECUTOR="celery", DATAMESH_BROKER_URL="redis://127.0.0.1:2/0")
    env["DATAMESH_DATA_DIR"] = str(tmp_path / "data")
    # when `python -m datamesh worker` starts (it runs `celery -A datamesh.workers.app worker`),
    done = subprocess.run(
        [sys.executable, "-m", "datamesh", "worker", "--role", "cp"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # then it exits at once, before any connection, naming the file's broker and the variable's.
    assert done.returncode != 0, done.stdout + done.stderr
    assert "configuration error in DATAMESH_BROKER_URL: celeryconfig.broker_url is 'redis://127.0.0.1:1/9'" in (
        done.stderr
    ), done.stderr
    assert "'redis://127.0.0.1:2/0'" in done.stderr


def test_the_shipped_celeryconfig_sets_only_what_the_celery_processes_alone_use(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given deployment variables in the environment
    monkeypatch.setenv("DATAMESH_BROKER_URL", "redis://queue.example:6379/2")
    monkeypatch.setenv("DATAMESH_AP_SHARDS", "3")
    monkeypatch.delitem(sys.modules, "celeryconfig", raising=False)
    config = DataMeshConfig.from_env().unwrap()
    # When the repository's celeryconfig.py is loaded by the app
    loaded = app_module.deployment_file_settings(Celery("probe")).unwrap()
    expected = app_module.deployment_settings(config)
    # Then it sets the beat schedules (the index drains' too), as computed,
    assert set(loaded) == {"beat_schedule"}
    assert loaded["beat_schedule"] == expected["beat_schedule"]
    # and none of the settings the callers share: a worker built with it and the executor's app
    # (which never loads it) agree on the broker and the queues.
    assert not set(loaded) & set(app_module.SHARED_SETTINGS)
    worker, caller = create_app(config).conf, create_app(config, load_celeryconfig=False).conf
    assert worker.broker_url == caller.broker_url == "redis://queue.example:6379/2"
    assert [q.name for q in worker.task_queues] == [q.name for q in caller.task_queues]
    assert "ap.eu-west.2" in [q.name for q in worker.task_queues]
    monkeypatch.delitem(sys.modules, "celeryconfig", raising=False)


def _loading(module: str) -> Any:
    real = app_module.deployment_file_settings

    def load(app: Celery, _: str = "celeryconfig") -> Result[dict[str, Any], ConfigError]:
        return real(app, module)

    return load


async def test_an_unsafe_visibility_timeout_is_a_config_error(tmp_path: Path) -> None:
    config = DataMeshConfig(data_dir=tmp_path, executor="celery", visibility_timeout_s=30.0)
    result = await IngestionPipeline.create(config)
    assert isinstance(result, Err) and isinstance(result.error, ConfigError)
    assert result.error.variable == "DATAMESH_VISIBILITY_TIMEOUT_S"


def test_routing_by_role_region_and_shard() -> None:
    assert queues.route(queues.WRITE_AP, (), {"region": "eu-west", "shard": 3}, {}) == {"queue": "ap.eu-west.3"}
    assert queues.route(queues.READ_AP, (), {"region": "eu-west", "shard": 3}, {}) == {"queue": "ap-read.eu-west.3"}
    assert queues.route(queues.UNDO_STORE_BLOBS, (), {"region": "us-east"}, {}) == {"queue": "blobs.us-east"}
    assert queues.route(queues.COMMIT_CP, (), {"saga_id": "x"}, {}) == {"queue": "cp"}
    assert queues.route(queues.INDEX_DRAIN, (), {"region": "eu-west"}, {}) == {"queue": "index.eu-west"}
    assert queues.route(queues.INDEX_DRAIN, (), {}, {}) == {"queue": "cp"}
    assert queues.route(queues.QUERY_INDEX, (), {"region": "eu-west", "op": "search"}, {}) == {
        "queue": "search.eu-west"
    }


def test_the_reaper_has_a_queue_of_its_own_that_cp_workers_consume() -> None:
    # Beat's reaper passes expire after one interval: behind a long cp backlog they would all expire
    # unrun, so they go to the reaper queue, which every cp (and all-roles) worker consumes too.
    assert queues.route(queues.REAP, (), {}, {}) == {"queue": "reaper"}
    schedule = deployment_settings(DataMeshConfig())["beat_schedule"]["reap-expired-sagas"]
    assert schedule["task"] == queues.REAP and schedule["options"]["queue"] == "reaper"
    for role in ("cp", "all"):
        args = build_parser().parse_args(["worker", "--role", role])
        (argv, _), *_ = worker_commands(args, DataMeshConfig())
        assert {"cp", "reaper"} <= set(argv[argv.index("-Q") + 1].split(",")), (role, argv)


def test_an_ap_pool_with_more_processes_than_shards_is_refused() -> None:
    args = build_parser().parse_args(["worker", "--role", "ap", "--shards", "0-1", "--processes", "3"])
    with pytest.raises(ValueError, match="--processes 3 is more than the 2 AP shards"):
        worker_commands(args, DataMeshConfig())


def test_index_queues_have_one_consumer_process() -> None:
    # An index pool is one process whatever --processes says (a region's index has one writer),
    args = build_parser().parse_args(["worker", "--role", "index", "--region", "eu-west", "--processes", "3"])
    commands = worker_commands(args, DataMeshConfig())
    assert [(argv[argv.index("-Q") + 1], argv[argv.index("-c") + 1]) for argv, _ in commands] == [
        ("index.eu-west", "1")
    ]
    # and a sharded all-roles pool gives them a process of its own, so no shard's saga steps wait
    # behind an index drain.
    args = build_parser().parse_args(["worker", "--role", "all", "--region", "eu-west", "--processes", "2"])
    commands = worker_commands(args, DataMeshConfig(ap_shards=2))
    consumed = [argv[argv.index("-Q") + 1].split(",") for argv, _ in commands]
    assert consumed[2] == ["index.eu-west"] and commands[2][1]["DATAMESH_WORKER_ROLE"] == "index"
    assert not any(q.startswith("index.") for q in consumed[0] + consumed[1])
    assert {"ap.eu-west.0", "ap.eu-west.1"} == {q for q in consumed[0] + consumed[1] if q.startswith("ap.")}


def test_search_queues_have_a_pool_of_their_own_apart_from_the_index_writer() -> None:
    # A search pool serves its regions' search queues with N processes (read-only: any number),
    args = build_parser().parse_args(["worker", "--role", "search", "--region", "eu-west", "--processes", "3"])
    commands = worker_commands(args, DataMeshConfig())
    assert [(argv[argv.index("-Q") + 1], argv[argv.index("-c") + 1]) for argv, _ in commands] == [
        ("search.eu-west", "3")
    ]
    assert commands[0][1]["DATAMESH_WORKER_ROLE"] == "search"
    # a one-process all-roles pool (one box) consumes them beside everything else,
    args = build_parser().parse_args(["worker", "--role", "all", "--region", "eu-west"])
    (argv, _), *_ = worker_commands(args, DataMeshConfig())
    assert {"index.eu-west", "search.eu-west"} <= set(argv[argv.index("-Q") + 1].split(","))
    # and a sharded one gives them a process of their own, apart from the index writer's: a search
    # never waits behind an index drain, nor behind a shard's saga steps.
    args = build_parser().parse_args(["worker", "--role", "all", "--region", "eu-west", "--processes", "2"])
    commands = worker_commands(args, DataMeshConfig(ap_shards=2))
    consumed = [argv[argv.index("-Q") + 1].split(",") for argv, _ in commands]
    assert consumed[3] == ["search.eu-west"] and commands[3][1]["DATAMESH_WORKER_ROLE"] == "search"
    assert not any(q.startswith("search.") for q in consumed[0] + consumed[1] + consumed[2])
    assert "search.eu-west" in queues.all_queues(2)  # declared, and its depth observed by the reaper


def test_an_ap_pool_deals_its_shards_to_one_consumer_each() -> None:
    args = build_parser().parse_args(
        ["worker", "--role", "ap", "--region", "eu-west", "--shards", "0-3", "--processes", "2"]
    )
    commands = worker_commands(args, DataMeshConfig())
    consumed = [argv[argv.index("-Q") + 1].split(",") for argv, _ in commands]
    # (each shard's writes and the reads routed to its owner, by the same process)
    assert consumed == [
        ["ap.eu-west.0", "ap-read.eu-west.0", "ap.eu-west.2", "ap-read.eu-west.2"],
        ["ap.eu-west.1", "ap-read.eu-west.1", "ap.eu-west.3", "ap-read.eu-west.3"],
    ]
    assert all(argv[argv.index("-c") + 1] == "1" for argv, _ in commands)
    assert all(env["DATAMESH_WORKER_REGIONS"] == "eu-west" for _, env in commands)


def test_a_worker_process_freezes_its_start_up_heap_and_collects_young_objects_less_often() -> None:
    # In a process of its own: the collector's settings are the whole interpreter's.
    code = (
        "import gc; from datamesh.workers import app;"
        "app._after_fork();"  # what worker_process_init runs in each pool process
        "print(gc.get_threshold()[0], gc.get_freeze_count() > 0)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.split() == [str(gc_tuning.YOUNG_THRESHOLD), "True"], out.stderr[-2000:]
