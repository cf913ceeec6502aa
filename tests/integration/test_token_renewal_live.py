"""Keys that expire every minute, over two minutes of predictions, version swaps and a forget job.

``tmu-admin serve start`` runs TorchServe with ``token_expiration_min=1`` and the extension (whose key keeper
renews TorchServe's keys). Meanwhile ``tmu-admin predict`` runs every half second, long-lived clients keep
working, the ``aux`` model is swapped between two versions the way a forget job does it, and a real forget
job on ``m`` runs after the first keys have expired. Nothing may fail.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests
import torch
from click.testing import CliRunner

import tmu_core.cli.serve_cmd  # noqa: F401  (attaches the commands)
from test_service_support import FAST_TMU, make_index, make_v1, make_workspace
from tmu_core.cli import cli
from tmu_core.config import Workspace
from tmu_core.errors import TmuError
from tmu_core.models import build_model
from tmu_core.service import swap
from tmu_core.service.server import read_info, read_key
from tmu_core.serving.archive import package_version
from tmu_core.serving.keys import read_keys
from tmu_core.serving.torchserve import TorchServeConfig
from tmu_core.train import CheckpointMeta, save_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.long]  # over two minutes of waiting for keys to expire

RUN_S = 125.0  # two key lifetimes of 60 s, and a little more
FORGET_AT_S = 65.0  # after the keys TorchServe started with have expired
SWAP_EVERY_S = 20.0
HARD_LIMIT_S = RUN_S + 150.0


@dataclass
class Tally:
    """What ran and what failed, with the second it happened at."""

    started: float = field(default_factory=time.monotonic)
    done: dict[str, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    keys_seen: dict[str, set[str]] = field(default_factory=lambda: {"management": set(), "inference": set()})

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def run(self, what: str, action) -> object:
        try:
            result = action()
        except (TmuError, AssertionError, requests.RequestException) as err:
            self.failures.append(f"t={self.elapsed():.0f}s {what}: {err}")
            return None
        self.done[what] = self.done.get(what, 0) + 1
        return result


def _aux_archives(workspace: Workspace, tmp_path: Path) -> None:
    for version in (1, 2):
        torch.manual_seed(version)
        model = build_model("small_cnn", 4, 3, 16).eval()
        meta = CheckpointMeta("small_cnn", 4, ("a", "b", "c", "d"), 3, 16, (0.0,) * 3, (1.0,) * 3, version, {},
                              "fp", 4)
        ckpt = save_checkpoint(tmp_path / f"aux{version}.pt", model, meta)
        package_version(ckpt, workspace, "aux", version, backend="torch", batch_size=1, max_batch_delay=1)


def _cli_predict(runner: CliRunner, base: list[str], image: Path) -> None:
    result = runner.invoke(cli, [*base, "predict", str(image), "--model", "m"])
    assert result.exit_code == 0, result.output.strip()[-300:]
    assert json.loads(result.output)[0]["model_version"] in ("1", "2")


def _swap_aux(workspace: Workspace, tally: Tally, serving: int) -> int:
    """What a forget job does to TorchServe: register the other version, make it default, drain, unregister."""
    spare = 3 - serving
    settings = swap.SwapSettings(drain_grace_s=0.2)
    archive = workspace.model_store / f"aux-v{spare}.mar"
    steps = [("register", lambda: swap.register(workspace, "aux", spare, archive, settings)),
             ("set-default", lambda: swap.set_default(workspace, "aux", spare)),
             ("drain", lambda: swap.drain(workspace, "aux", serving, settings)),
             ("unregister", lambda: swap.unregister(workspace, "aux", serving))]
    for name, step in steps:
        tally.run(name, step)
        if tally.failures:
            return serving
    return spare


def _submit_forget(workspace: Workspace) -> str:
    info = read_info(workspace)
    resp = requests.post(f"{info.url}/forget/m", headers={"Authorization": f"Bearer {read_key(workspace)}"},
                         json={"owner_ids": ["owner-a-0"], "options": FAST_TMU}, timeout=30)
    assert resp.status_code == 202, resp.text
    return resp.json()["job_id"]


def _job(workspace: Workspace, job_id: str) -> dict:
    info = read_info(workspace)
    return requests.get(f"{info.url}/jobs/{job_id}", headers={"Authorization": f"Bearer {read_key(workspace)}"},
                        timeout=10).json()


def _operate(workspace: Workspace, runner: CliRunner, base: list[str], image: Path, tally: Tally) -> dict | None:
    """Predict, manage and forget until RUN_S has passed and the job is done, or something failed."""
    server = swap.attach_torchserve(workspace)
    inference, management = server.inference(), server.management()  # long-lived clients
    job_id, job, aux, next_swap = None, None, 2, SWAP_EVERY_S
    while not tally.failures and tally.elapsed() < HARD_LIMIT_S:
        tally.run("tmu-admin predict", lambda: _cli_predict(runner, base, image))
        tally.run("predict (long-lived client)", lambda: inference.predict("m", image.read_bytes()))
        tally.run("list models (long-lived client)", management.list_models)
        keys = read_keys(server.key_file)
        tally.keys_seen["management"].add(keys.management)
        tally.keys_seen["inference"].add(keys.inference)
        if tally.elapsed() >= next_swap:
            aux, next_swap = _swap_aux(workspace, tally, aux), tally.elapsed() + SWAP_EVERY_S
        if job_id is None and tally.elapsed() >= FORGET_AT_S:
            job_id = _submit_forget(workspace)
        if job_id is not None and (job is None or job["state"] not in ("succeeded", "failed")):
            job = _job(workspace, job_id)
        if tally.elapsed() >= RUN_S and job is not None and job["state"] in ("succeeded", "failed"):
            break
        time.sleep(0.5)
    return job


def test_two_expiry_periods_without_a_failed_request(tmp_path):
    workspace = make_workspace(tmp_path)
    make_index(workspace, tmp_path).close()
    make_v1(workspace)
    _aux_archives(workspace, tmp_path)
    props = TorchServeConfig.with_free_ports(workspace.model_store, token_expiration_min=1).write(
        tmp_path / "config.properties")
    base = ["--home", str(workspace.home), "--model-store", str(workspace.model_store)]
    image = tmp_path / "tree" / "test" / "a" / "0000.png"
    runner = CliRunner()
    try:
        started = runner.invoke(cli, [*base, "serve", "start", "--config", str(props)])
        assert started.exit_code == 0, started.output
        assert json.loads(started.output)["models"] == {"m": 1, "aux": 2}
        tally = Tally()
        job = _operate(workspace, runner, base, image, tally)
        extension_log = (workspace.serve_dir / "extension.log").read_text()
    finally:
        stopped = runner.invoke(cli, [*base, "serve", "stop"])
    assert stopped.exit_code == 0, stopped.output
    assert tally.failures == [], f"after {tally.done}: {tally.failures}"
    assert tally.elapsed() >= RUN_S
    assert job is not None and job["state"] == "succeeded", (job or {}).get("reason")
    assert tally.done["register"] >= 3 and tally.done["unregister"] >= 3 and tally.done["tmu-admin predict"] > 60
    # two renewals of each key at least, done by the extension's keeper
    assert min(len(seen) for seen in tally.keys_seen.values()) >= 3, tally.keys_seen
    assert extension_log.count("renewed torchserve management key") >= 2
    assert extension_log.count("renewed torchserve inference key") >= 2
