"""``tmu-admin serve start --backend ray`` -> predict -> rollback (through the extension) -> status -> stop, on the
loopback Ray cluster."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ray_support import make_versions, png
from tmu_core.cli import cli
from tmu_core.serving.backend import BACKEND_FILE, TOKEN_FILE

pytestmark = pytest.mark.ray


def test_serve_start_on_ray_then_predict_rollback_and_stop(serve_cluster, serve_port, tmp_path):
    workspace = make_versions(tmp_path, "m")
    base = ["--home", str(workspace.home), "--model-store", str(workspace.model_store)]
    image = tmp_path / "x.png"
    image.write_bytes(png(3))
    runner = CliRunner()
    try:
        started = runner.invoke(cli, [*base, "serve", "start", "--backend", "ray", "--ray-address",
                                      serve_cluster.address, "--replicas", "2", "--http-port", str(serve_port)])
        assert started.exit_code == 0, started.output
        info = json.loads(started.stdout)
        assert info["backend"] == "ray" and info["models"] == {"m": 1} and len(info["replicas"]["m"]) == 2
        assert info["started"] == ["model:m", "extension"] and info["token_file"].endswith(TOKEN_FILE)
        assert json.loads((workspace.serve_dir / BACKEND_FILE).read_text())["kind"] == "ray"

        again = runner.invoke(cli, [*base, "serve", "start", "--backend", "ray", "--ray-address",
                                    serve_cluster.address])
        assert again.exit_code == 0 and json.loads(again.stdout)["started"] == [], again.output

        predicted = runner.invoke(cli, [*base, "predict", str(image), "--model", "m", "--top-k", "2"])
        assert predicted.exit_code == 0, predicted.output
        answer = json.loads(predicted.stdout)[0]
        assert answer["model_version"] == "1" and len(answer["predictions"]) == 2
        wrong = runner.invoke(cli, [*base, "predict", str(image), "--model", "m", "--version", "2"])
        assert wrong.exit_code == 1 and "version '2' of m is not served" in wrong.output

        rolled = runner.invoke(cli, [*base, "rollback", "m", "--to", "2"])
        assert rolled.exit_code == 0, rolled.output
        assert (json.loads(rolled.stdout)["from_version"], json.loads(rolled.stdout)["to_version"]) == (1, 2)
        predicted = runner.invoke(cli, [*base, "predict", str(image), "--model", "m"])
        assert json.loads(predicted.stdout)[0]["model_version"] == "2", predicted.output

        status = runner.invoke(cli, [*base, "serve", "status"])
        assert status.exit_code == 0 and json.loads(status.stdout)["ray_serve"]["replicas"] == 2, status.output
    finally:
        stopped = runner.invoke(cli, [*base, "serve", "stop"])
    assert stopped.exit_code == 0, stopped.output
    assert stopped.stdout.splitlines() == ["extension stopped.", "Ray Serve applications deleted."]
    assert not (workspace.serve_dir / BACKEND_FILE).exists()
