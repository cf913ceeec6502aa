"""``<serve_dir>/backend.json`` and ``ray_token``: no file is TorchServe, bad settings are refused with what is
accepted, the token file is private. No cluster needed; marked ``ray`` with the rest of the backend's tests."""

from __future__ import annotations

import json
import os
import stat

import pytest

from tmu_core.config import Workspace
from tmu_core.errors import CheckpointError, InvalidInputError
from tmu_core.serving.backend import (BACKEND_FILE, TOKEN_FILE, BackendSpec, load_or_create_token, read_backend,
                                      write_backend)

pytestmark = pytest.mark.ray


def test_no_file_is_torchserve(tmp_path):
    from tmu_core.service import swap

    workspace = Workspace(home=tmp_path / "home", model_store=tmp_path / "store")
    assert read_backend(workspace.serve_dir) == BackendSpec()
    assert isinstance(swap.backend_for(workspace), swap.TorchServeBackend)


def test_a_ray_spec_round_trips_and_torchserve_removes_the_file(tmp_path):
    spec = BackendSpec(kind="ray", address="127.0.0.1:6379", http_port=8123, replicas=3)
    path = write_backend(tmp_path, spec)
    assert json.loads(path.read_text())["kind"] == "ray" and read_backend(tmp_path) == spec
    write_backend(tmp_path, BackendSpec())
    assert not (tmp_path / BACKEND_FILE).exists()


@pytest.mark.parametrize("content, message", [
    ('{"kind": "k8s"}', r"serving backend must be one of \['torchserve', 'ray'\], got 'k8s'"),
    ('{"kind": "ray"}', r"the ray serving backend needs the cluster's address \(--ray-address\)"),
    ('{"kind": "ray", "address": "a:1", "replica": 2}', r"unknown keys \['replica'\] in backend.json; accepted"),
    ('{"kind": "ray", "address": "a:1", "replicas": 0}', r"replicas must be an int >= 1, got 0"),
    ("[1]", r"holds a list; expected a JSON object"),
    ("{", r"is not JSON"),
])
def test_bad_settings_are_refused(tmp_path, content, message):
    (tmp_path / BACKEND_FILE).write_text(content)
    with pytest.raises(InvalidInputError, match=message):
        read_backend(tmp_path)


def test_the_token_file_is_made_private_and_kept(tmp_path):
    token = load_or_create_token(tmp_path)
    assert len(token) >= 32 and load_or_create_token(tmp_path) == token
    assert stat.S_IMODE(os.stat(tmp_path / TOKEN_FILE).st_mode) == 0o600
    os.chmod(tmp_path / TOKEN_FILE, 0o644)
    with pytest.raises(CheckpointError, match=r"has mode 0o644; the token file must be readable by its owner only"):
        load_or_create_token(tmp_path)
