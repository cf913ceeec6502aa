"""tmu-admin package -> serve start -> predict -> serve status -> serve stop, against a real TorchServe."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import requests
import torch
from click.testing import CliRunner
from PIL import Image

import tmu_core.cli.serve_cmd  # noqa: F401  (attaches the commands)
from tmu_core.cli import cli
from tmu_core.config import Workspace
from tmu_core.service.server import status as extension_status
from tmu_core.service.server import stop as extension_stop
from tmu_core.models import build_model
from tmu_core.serving.torchserve import TorchServe, TorchServeConfig, pid_alive
from tmu_core.train import CheckpointMeta, save_checkpoint

pytestmark = pytest.mark.integration


def test_cli_round_trip(tmp_path):
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 3, 12).eval()
    meta = CheckpointMeta("small_cnn", 3, ("r", "g", "b"), 3, 12, (0.0,) * 3, (1.0,) * 3, 0, {}, "fp", 5)
    ckpt = save_checkpoint(tmp_path / "m.pt", model, meta)
    workspace = Workspace(home=tmp_path / "home", model_store=tmp_path / "store")
    config = TorchServeConfig.with_free_ports(workspace.model_store)
    props = config.write(tmp_path / "config.properties")
    base = ["--home", str(workspace.home), "--model-store", str(workspace.model_store)]
    image = tmp_path / "img.png"
    pixels = np.random.default_rng(0).integers(0, 256, (12, 12, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    image.write_bytes(buf.getvalue())
    runner = CliRunner()
    try:
        packaged = runner.invoke(cli, [*base, "package", str(ckpt), "--model", "tiny"])
        assert packaged.exit_code == 0, packaged.output
        started = runner.invoke(cli, [*base, "serve", "start", "--model", "tiny", "--config", str(props)])
        assert started.exit_code == 0, started.output
        info = json.loads(started.output)
        assert info["models"] == {"tiny": 1} and info["inference_url"] == config.url("inference")
        assert info["key_file"].endswith("key_file.json")
        assert info["extension_url"].startswith("http://127.0.0.1:")
        health = requests.get(info["extension_url"] + "/health", timeout=5)
        assert health.status_code == 200
        pid = info["pid"]

        predicted = runner.invoke(cli, [*base, "predict", str(image), "--model", "tiny", "--top-k", "2"])
        assert predicted.exit_code == 0, predicted.output
        answer = json.loads(predicted.output)[0]
        x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            top = torch.softmax(model(x), 1)[0].argsort(descending=True)[:2].tolist()
        assert answer["model_version"] == "1" and [p["index"] for p in answer["predictions"]] == top

        status = json.loads(runner.invoke(cli, [*base, "serve", "status"]).output)
        assert status["torchserve"]["running"] is True and status["torchserve"]["models"] == ["tiny"]
        assert status["extension"]["url"] == info["extension_url"]
        stopped = runner.invoke(cli, [*base, "serve", "stop"])
        assert stopped.exit_code == 0
        assert stopped.output.splitlines() == ["extension stopped.", "TorchServe stopped."]
        assert not pid_alive(pid)
        assert extension_status(workspace) is None
    finally:
        extension_stop(workspace)
        TorchServe(workspace, config).stop()
