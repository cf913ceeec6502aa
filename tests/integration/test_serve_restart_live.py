"""``tmu-admin serve start`` starts only what is not running: the restart step after TorchServe or the extension died.

Against a real TorchServe (token auth on, free loopback ports): a second ``serve start`` changes nothing; after
TorchServe is killed with SIGKILL, ``serve start`` brings it back with the registry's serving version while the
extension keeps running (same pid), and the killed server's model workers are gone; after the extension stops,
``serve start`` starts the extension only.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import tmu_core.cli.serve_cmd  # noqa: F401  (attaches the commands)
from tmu_core.cli import cli
from tmu_core.config import Workspace
from tmu_core.models import build_model
from tmu_core.service.server import status as extension_status
from tmu_core.service.server import stop as extension_stop
from tmu_core.serving.torchserve import TorchServe, TorchServeConfig, pid_alive
from tmu_core.state.versions import VersionRegistry
from tmu_core.train import CheckpointMeta, save_checkpoint

pytestmark = pytest.mark.integration


def _wait_dead(pids: list[int], timeout: float = 30.0) -> list[int]:
    """Wait until every pid has exited; return those still alive at ``timeout``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(pid_alive(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if pid_alive(p)]


def _image(tmp_path) -> str:
    pixels = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    path = tmp_path / "img.png"
    path.write_bytes(buf.getvalue())
    return str(path)


def test_serve_start_restarts_only_what_died(tmp_path):
    torch.manual_seed(0)
    meta = CheckpointMeta("small_cnn", 3, ("r", "g", "b"), 3, 12, (0.0,) * 3, (1.0,) * 3, 0, {}, "fp", 5)
    ckpt = save_checkpoint(tmp_path / "m.pt", build_model("small_cnn", 3, 3, 12).eval(), meta)
    workspace = Workspace(home=tmp_path / "home", model_store=tmp_path / "store")
    config = TorchServeConfig.with_free_ports(workspace.model_store)
    props = str(config.write(tmp_path / "config.properties"))
    base = ["--home", str(workspace.home), "--model-store", str(workspace.model_store)]
    runner = CliRunner()

    def start() -> dict:
        result = runner.invoke(cli, [*base, "serve", "start", "--config", props])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    def predicted_version() -> str:
        result = runner.invoke(cli, [*base, "predict", _image(tmp_path), "--model", "tiny"])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)[0]["model_version"]

    try:
        for _ in (1, 2):
            assert runner.invoke(cli, [*base, "package", str(ckpt), "--model", "tiny"]).exit_code == 0
        first = start()
        assert first["started"] == ["torchserve", "extension"] and first["models"] == {"tiny": 1}
        ext_pid = extension_status(workspace).pid

        again = start()
        assert again["started"] == [] and again["pid"] == first["pid"] and again["models"] == {"tiny": 1}
        assert again["extension_url"] == first["extension_url"]

        # The registry now says v2 serves (as after a committed swap): a restart must load v2, not v1.
        VersionRegistry(workspace.state_db).set_state("tiny", 2, "serving")
        workers = [w.pid for info in TorchServe(workspace, config).management().describe("tiny", "all")
                   for w in info.workers if w.pid]
        os.kill(first["pid"], signal.SIGKILL)
        assert _wait_dead([first["pid"]]) == []
        restarted = start()
        assert restarted["started"] == ["torchserve"] and restarted["models"] == {"tiny": 2}
        assert restarted["pid"] != first["pid"] and restarted["inference_url"] == config.url("inference")
        assert extension_status(workspace).pid == ext_pid
        assert predicted_version() == "2"
        assert workers and _wait_dead(workers) == [], "the killed TorchServe's model workers still run"

        assert extension_stop(workspace)
        ext_only = start()
        assert ext_only["started"] == ["extension"] and ext_only["pid"] == restarted["pid"]
        assert extension_status(workspace).pid != ext_pid
        assert predicted_version() == "2"
    finally:
        extension_stop(workspace)
        TorchServe(workspace, config).stop()
