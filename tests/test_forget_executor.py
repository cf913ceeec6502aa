"""Executor settings: checked on construction, and given unchanged to the extension and worker processes."""

from __future__ import annotations

import argparse

import pytest

from test_service_support import make_workspace
from tmu_core.errors import InvalidInputError
from tmu_core.forget.dispatcher import WorkerSettings, worker_command
from tmu_core.forget.executor import ExecutorSettings, LocalExecutor, add_executor_flags, executor_from, make_executor


def _round_trip(settings: ExecutorSettings) -> ExecutorSettings:
    parser = argparse.ArgumentParser()
    add_executor_flags(parser)
    return executor_from(parser.parse_args(settings.flags()))


def test_settings_reach_a_worker_process_unchanged(tmp_path) -> None:
    ray = ExecutorSettings(kind="ray", ray_address="10.0.0.5:6379", ray_num_cpus=4, ray_num_gpus=1,
                           ray_resources=(("tmu_jobs", 1.0),), ray_timeout_s=600, pause_at="unlearn", pause_s=5)
    assert _round_trip(ray) == ray
    assert _round_trip(ExecutorSettings()) == ExecutorSettings() and ExecutorSettings().flags() == []
    cmd = worker_command(make_workspace(tmp_path), "job-1", WorkerSettings(executor=ray))
    assert cmd[cmd.index("--executor") + 1] == "ray" and cmd[cmd.index("--ray-address") + 1] == "10.0.0.5:6379"
    assert "--executor" not in worker_command(make_workspace(tmp_path), "job-1", WorkerSettings())


@pytest.mark.parametrize("kwargs, message", [
    ({"kind": "spark"}, "executor must be one of local, ray"),
    ({"kind": "ray"}, "needs the cluster's address"),
    ({"kind": "ray", "ray_address": "h:1", "ray_num_cpus": 0}, "ray_num_cpus and ray_timeout_s must be > 0"),
    ({"pause_at": "commit"}, "pause_at must be prepare, unlearn or evaluate"),
])
def test_bad_settings_say_what_is_accepted(kwargs, message) -> None:
    with pytest.raises(InvalidInputError, match=message):
        ExecutorSettings(**kwargs)


def test_a_bad_resource_flag_says_what_is_accepted() -> None:
    parser = argparse.ArgumentParser(exit_on_error=False)
    add_executor_flags(parser)
    with pytest.raises(argparse.ArgumentError, match="NAME=AMOUNT"):
        parser.parse_args(["--ray-resource", "tmu_jobs"])


def test_the_default_executor_is_the_worker_process(tmp_path) -> None:
    assert isinstance(make_executor(ExecutorSettings(), make_workspace(tmp_path)), LocalExecutor)
