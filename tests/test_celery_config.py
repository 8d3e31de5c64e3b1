"""Celery configuration that needs no running service: variables, routing, the worker command lines."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from datamesh.cli.main import build_parser
from datamesh.core.config import DataMeshConfig, parse_shards
from datamesh.core.errors import ConfigError
from datamesh.core.result import Err
from datamesh.pipeline.ingestion import IngestionPipeline
from datamesh.pipeline.tiers import Tiers
from datamesh.workers import app as app_module
from datamesh.workers import queues
from datamesh.workers.app import create_app
from datamesh.workers.cli import worker_commands


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
    }


def test_a_deployment_file_overrides_the_computed_settings_but_not_the_reliability_ones(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a deployment file that moves the broker and the default queue, and tries to weaken acks
    (tmp_path / "site_celery.py").write_text(
        "broker_url = 'redis://broker.example:6380/4'\n"
        "task_default_queue = 'elsewhere'\n"
        "task_acks_late = False\n"
        "not_a_celery_setting = 1\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(app_module, "deployment_file_settings", _loading("site_celery"))
    # When the app is built from a configuration that says otherwise
    conf = create_app(DataMeshConfig(broker_url="redis://127.0.0.1:6379/0")).conf
    # Then the file's deployment settings win, the reliability settings do not move
    assert conf.broker_url == "redis://broker.example:6380/4" and conf.task_default_queue == "elsewhere"
    assert conf.task_acks_late is True and "not_a_celery_setting" not in conf


def test_the_shipped_celeryconfig_is_what_datamesh_computes_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Given deployment variables in the environment
    monkeypatch.setenv("DATAMESH_BROKER_URL", "redis://queue.example:6379/2")
    monkeypatch.setenv("DATAMESH_AP_SHARDS", "3")
    monkeypatch.delitem(sys.modules, "celeryconfig", raising=False)
    # When the repository's celeryconfig.py is loaded by the app
    loaded = app_module.deployment_file_settings(Celery("probe"))
    expected = app_module.deployment_settings(DataMeshConfig.from_env().unwrap())
    # Then it sets every deployment setting (the index drains' schedules too), as computed
    assert set(loaded) == set(expected) and loaded["broker_url"] == "redis://queue.example:6379/2"
    assert loaded["beat_schedule"] == expected["beat_schedule"]
    assert [q.name for q in loaded["task_queues"]] == [q.name for q in expected["task_queues"]]
    assert "ap.eu-west.2" in [q.name for q in loaded["task_queues"]]
    monkeypatch.delitem(sys.modules, "celeryconfig", raising=False)


def _loading(module: str) -> Any:
    real = app_module.deployment_file_settings

    def load(app: Celery, _: str = "celeryconfig") -> dict[str, Any]:
        return real(app, module)

    return load


async def test_an_unsafe_visibility_timeout_is_a_config_error(tmp_path: Path) -> None:
    config = DataMeshConfig(data_dir=tmp_path, executor="celery", visibility_timeout_s=30.0)
    result = await IngestionPipeline.create(config)
    assert isinstance(result, Err) and isinstance(result.error, ConfigError)
    assert result.error.variable == "DATAMESH_VISIBILITY_TIMEOUT_S"


def test_routing_by_role_region_and_shard() -> None:
    assert queues.route(queues.WRITE_AP, (), {"region": "eu-west", "shard": 3}, {}) == {"queue": "ap.eu-west.3"}
    assert queues.route(queues.UNDO_STORE_BLOBS, (), {"region": "us-east"}, {}) == {"queue": "blobs.us-east"}
    assert queues.route(queues.COMMIT_CP, (), {"saga_id": "x"}, {}) == {"queue": "cp"}
    assert queues.route(queues.INDEX_DRAIN, (), {"region": "eu-west"}, {}) == {"queue": "index.eu-west"}
    assert queues.route(queues.INDEX_DRAIN, (), {}, {}) == {"queue": "cp"}


def test_index_queues_have_one_consumer_process() -> None:
    # An index pool is one process whatever --processes says (a region's index has one writer),
    args = build_parser().parse_args(["worker", "--role", "index", "--region", "eu-west", "--processes", "3"])
    commands = worker_commands(args, DataMeshConfig())
    assert [(argv[argv.index("-Q") + 1], argv[argv.index("-c") + 1]) for argv, _ in commands] == [
        ("index.eu-west", "1")
    ]
    # and in a sharded all-roles pool only the first worker consumes the index queues.
    args = build_parser().parse_args(["worker", "--role", "all", "--region", "eu-west", "--processes", "2"])
    consumed = [argv[argv.index("-Q") + 1].split(",") for argv, _ in worker_commands(args, DataMeshConfig(ap_shards=2))]
    assert "index.eu-west" in consumed[0] and not any(q.startswith("index.") for q in consumed[1])


def test_an_ap_pool_deals_its_shards_to_one_consumer_each() -> None:
    args = build_parser().parse_args(
        ["worker", "--role", "ap", "--region", "eu-west", "--shards", "0-3", "--processes", "2"]
    )
    commands = worker_commands(args, DataMeshConfig())
    consumed = [argv[argv.index("-Q") + 1].split(",") for argv, _ in commands]
    assert consumed == [["ap.eu-west.0", "ap.eu-west.2"], ["ap.eu-west.1", "ap.eu-west.3"]]
    assert all(argv[argv.index("-c") + 1] == "1" for argv, _ in commands)
    assert all(env["DATAMESH_WORKER_REGIONS"] == "eu-west" for _, env in commands)
