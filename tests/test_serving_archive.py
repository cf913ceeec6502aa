"""Packaging: the .mar's contents, no overwrite, refusal on a failed ONNX check, and a handler run on it."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import tmu_core.serving.archive as archive_mod
from handler.tmu_handler import TmuHandler
from tmu_core.config import Workspace
from tmu_core.errors import CheckpointError, ConflictError, InvalidInputError, ModelNotFoundError
from tmu_core.models import build_model
from tmu_core.serving.archive import latest_archives, package_version
from tmu_core.serving.export import export_onnx
from tmu_core.train import CheckpointMeta, save_checkpoint

CLASSES = ("ant", "bee", "cat", "dog")


@pytest.fixture
def checkpoint(tmp_path: Path) -> tuple[Path, CheckpointMeta]:
    torch.manual_seed(0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = build_model("small_cnn", 4, 3, 16, mean, std)
    meta = CheckpointMeta("small_cnn", 4, CLASSES, 3, 16, mean, std, 0, {"epochs": 1}, "fp", 10)
    return save_checkpoint(tmp_path / "trained.pt", model, meta), meta


@pytest.fixture
def workspace(tmp_path: Path) -> Workspace:
    return Workspace(home=tmp_path / "home", model_store=tmp_path / "store")


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_package_writes_a_complete_archive(checkpoint, workspace):
    ckpt, meta = checkpoint
    result = package_version(ckpt, workspace, "tiny", 1, backend="torch", batch_size=4, max_batch_delay=30,
                             top_k=3)
    assert result.archive == workspace.model_store / "tiny-v1.mar"
    assert sorted(p.name for p in workspace.model_store.iterdir()) == ["tiny-v1.mar"]  # no staging leftovers
    vdir = workspace.version_dir("tiny", 1)
    assert result.checkpoint == vdir / "checkpoint.pt" and result.onnx == vdir / "model.onnx"
    assert result.onnx_check.max_abs_diff <= 1e-4
    with zipfile.ZipFile(result.archive) as zf:
        assert sorted(zf.namelist()) == sorted(["MAR-INF/MANIFEST.json", "checkpoint.pt", "meta.json", "model.onnx",
                                                "model-config.yaml", "tmu_handler.py"])
        manifest = json.loads(zf.read("MAR-INF/MANIFEST.json"))["model"]
        config = yaml.safe_load(zf.read("model-config.yaml"))
        assert json.loads(zf.read("meta.json")) == meta.to_dict()
        assert _sha(zf.read("model.onnx")) == result.sha256s["onnx"]
        assert _sha(zf.read("checkpoint.pt")) == result.sha256s["checkpoint"] == _sha(ckpt.read_bytes())
        assert zf.read("tmu_handler.py") == Path(archive_mod.handler_source()).read_bytes()
    assert manifest == {"modelName": "tiny", "serializedFile": "checkpoint.pt", "handler": "tmu_handler.py",
                        "modelVersion": "1", "configFile": "model-config.yaml"}
    assert config == {"minWorkers": 1, "maxWorkers": 1, "batchSize": 4, "maxBatchDelay": 30, "responseTimeout": 120,
                      "handler": {"backend": "torch", "top_k": 3, "max_bytes": 6 << 20, "max_pixels": 40_000_000,
                                  "max_images": 64, "threads": 0}}
    assert result.sha256s["archive"] == _sha(result.archive.read_bytes())


def test_an_existing_archive_is_never_overwritten(checkpoint, workspace):
    ckpt, _ = checkpoint
    first = package_version(ckpt, workspace, "tiny", 1)
    with pytest.raises(ConflictError, match=r"tiny-v1.mar already exists; versions are never overwritten"):
        package_version(ckpt, workspace, "tiny", 1, backend="torch")
    assert _sha(first.archive.read_bytes()) == first.sha256s["archive"]


def test_a_failed_onnx_check_writes_no_archive(checkpoint, workspace, monkeypatch):
    ckpt, _ = checkpoint

    def strict_export(model, meta, path, **kwargs):
        # The real export and check, with a tolerance no copy can meet.
        return export_onnx(model, meta, path, tolerance=-1.0, rtol=-1.0)

    monkeypatch.setattr(archive_mod, "export_onnx", strict_export)
    with pytest.raises(CheckpointError, match="disagrees with torch"):
        package_version(ckpt, workspace, "tiny", 1)
    assert not workspace.archive_path("tiny", 1).exists()
    assert not (workspace.version_dir("tiny", 1) / "model.onnx").exists()


def test_a_different_checkpoint_already_stored_for_the_version_is_a_conflict(checkpoint, workspace, tmp_path):
    ckpt, _ = checkpoint
    stored = workspace.version_dir("tiny", 1) / "checkpoint.pt"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"another model")
    with pytest.raises(ConflictError, match="already holds a different checkpoint"):
        package_version(ckpt, workspace, "tiny", 1)
    assert not workspace.archive_path("tiny", 1).exists()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"model_name": "bad name"}, "model name 'bad name' is not accepted"),
    ({"version": 0}, "version must be an integer >= 1, got 0"),
    ({"backend": "tensorrt"}, r"backend must be one of \['onnx', 'torch'\]"),
    ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
])
def test_bad_arguments_are_refused_before_any_work(checkpoint, workspace, kwargs, message):
    ckpt, _ = checkpoint
    args = {"model_name": "tiny", "version": 1, **kwargs}
    with pytest.raises(InvalidInputError, match=message):
        package_version(ckpt, workspace, **args)
    assert not workspace.model_store.exists() or not any(workspace.model_store.iterdir())


def test_an_unreadable_checkpoint_is_a_checkpoint_error(tmp_path, workspace):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        package_version(bad, workspace, "tiny", 1)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_the_unpacked_archive_serves_in_the_handler(checkpoint, workspace, tmp_path, backend):
    ckpt, _ = checkpoint
    result = package_version(ckpt, workspace, "tiny", 2, backend=backend, top_k=2)
    unpacked = tmp_path / "unpacked"
    with zipfile.ZipFile(result.archive) as zf:
        zf.extractall(unpacked)

    class Context:
        system_properties = {"model_dir": str(unpacked), "gpu_id": None}
        manifest = json.loads((unpacked / "MAR-INF" / "MANIFEST.json").read_text())
        model_yaml_config = yaml.safe_load((unpacked / "model-config.yaml").read_text())
        metrics = None

        def set_response_status(self, code, phrase, idx):
            raise AssertionError(f"unexpected status {code} {phrase}")

    handler = TmuHandler()
    handler.initialize(Context())
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(buf, "PNG")
    answer = handler.handle([{"body": buf.getvalue()}], Context())[0]
    assert answer["model_version"] == "2" and len(answer["predictions"]) == 2
    assert handler.service.predictor.name == backend


def test_latest_archives_picks_the_highest_version(tmp_path):
    for name in ("a-v1.mar", "a-v10.mar", "a-v2.mar", "net-v2-v3.mar", "notes.txt", "b.mar"):
        (tmp_path / name).write_bytes(b"")
    found = latest_archives(tmp_path)
    assert found == {"a": (10, tmp_path / "a-v10.mar"), "net-v2": (3, tmp_path / "net-v2-v3.mar")}
    assert latest_archives(tmp_path, ["a"]) == {"a": (10, tmp_path / "a-v10.mar")}
    with pytest.raises(ModelNotFoundError, match=r"for \['zebra'\]; archived models: \['a', 'net-v2'\]"):
        latest_archives(tmp_path, ["zebra"])


def test_the_next_version_is_packaged_with_every_option_of_the_archive(checkpoint, workspace):
    """The handler config is described once: every ServingOptions field survives the archive round trip."""
    from dataclasses import asdict

    from tmu_core.serving.archive import ServingOptions

    chosen = ServingOptions(backend="torch", batch_size=4, max_batch_delay=7, top_k=3, max_bytes=12345,
                            min_workers=1, max_workers=2, response_timeout=33, threads=2)
    ckpt, _ = checkpoint
    result = package_version(ckpt, workspace, "m", 1, **asdict(chosen))
    assert ServingOptions.from_archive(result.archive) == chosen
    second = package_version(ckpt, workspace, "m", 2, **asdict(ServingOptions.from_archive(result.archive)))
    assert ServingOptions.from_archive(second.archive).threads == 2


def test_options_of_a_missing_archive_are_a_checkpoint_error(tmp_path):
    from tmu_core.serving.archive import ServingOptions

    with pytest.raises(CheckpointError, match="cannot read model-config.yaml"):
        ServingOptions.from_archive(tmp_path / "nope.mar")
