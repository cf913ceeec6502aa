"""tmu-admin package / serve / predict without a running server (the live ones are in tests/integration)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import tmu_core.cli.serve_cmd  # noqa: F401  (attaches the commands)
from tmu_core.cli import cli
from tmu_core.models import build_model
from tmu_core.state.versions import VersionRegistry
from tmu_core.train import CheckpointMeta, save_checkpoint


@pytest.fixture
def env(tmp_path: Path) -> tuple[list[str], Path, Path]:
    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 1, 8)
    meta = CheckpointMeta("small_cnn", 3, ("x", "y", "z"), 1, 8, (0.0,), (1.0,), 0, {}, "fp", 5)
    ckpt = save_checkpoint(tmp_path / "trained.pt", model, meta)
    home = tmp_path / "home"
    return ["--home", str(home), "--model-store", str(tmp_path / "store")], ckpt, home


def test_package_records_versions_in_the_registry(env):
    base, ckpt, home = env
    runner = CliRunner()
    first = runner.invoke(cli, [*base, "package", str(ckpt), "--model", "digits"])
    assert first.exit_code == 0, first.output
    out = json.loads(first.output)
    assert out["version"] == 1 and out["archive"].endswith("digits-v1.mar") and out["onnx_max_abs_diff"] <= 1e-4
    second = runner.invoke(cli, [*base, "package", str(ckpt), "--model", "digits", "--backend", "torch"])
    assert second.exit_code == 0, second.output
    assert json.loads(second.output)["version"] == 2
    records = VersionRegistry(home / "state.sqlite").versions("digits")
    assert [(r.version, r.state) for r in records] == [(1, "serving"), (2, "superseded")]
    assert records[0].archive_sha256 == out["sha256"]["archive"]


def test_package_refuses_a_recorded_version(env):
    base, ckpt, _ = env
    runner = CliRunner()
    assert runner.invoke(cli, [*base, "package", str(ckpt), "--model", "digits"]).exit_code == 0
    again = runner.invoke(cli, [*base, "package", str(ckpt), "--model", "digits", "--version", "1"])
    assert again.exit_code == 1
    assert "version 1 of 'digits' is already recorded; the next free one is 2" in again.output


def test_package_rejects_a_bad_backend(env):
    base, ckpt, _ = env
    result = CliRunner().invoke(cli, [*base, "package", str(ckpt), "--model", "m", "--backend", "tvm"])
    assert result.exit_code == 2 and "'tvm' is not one of 'onnx', 'torch'" in result.output


def test_serve_status_and_stop_without_a_server(env):
    base, _, _ = env
    runner = CliRunner()
    status = runner.invoke(cli, [*base, "serve", "status"])
    assert status.exit_code == 0
    assert json.loads(status.output)["torchserve"]["running"] is False
    assert json.loads(status.output)["extension"] is None
    stop = runner.invoke(cli, [*base, "serve", "stop"])
    assert stop.exit_code == 0
    assert stop.output.splitlines() == ["extension was not running.", "TorchServe was not running."]


def test_serve_start_without_archives_says_what_to_do(env, tmp_path):
    base, _, _ = env
    result = CliRunner().invoke(cli, [*base, "serve", "start", "--model", "digits"])
    assert result.exit_code == 1 and "no archive <name>-v<N>.mar in" in result.output


def test_predict_without_a_server_names_the_key_file(env, tmp_path):
    base, _, _ = env
    image = tmp_path / "x.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    result = CliRunner().invoke(cli, [*base, "predict", str(image), "--model", "digits"])
    assert result.exit_code == 1 and "cannot read TorchServe keys from" in result.output
