"""End to end on a real TorchServe: an imported torchvision ResNet-18 forgets an owner's samples over HTTP."""

from __future__ import annotations

import pytest
import requests
import torch
from torchvision.models import get_model

from e2e_support import assert_serving, audit_kinds, wait_wiped
from test_e2e_forget import _wait
from test_service_support import CLASSES, FAST_TMU, SIZE, make_index, make_workspace, torchserve_config
from tmu_core.forget.dispatcher import WorkerSettings
from tmu_core.index import TrainingIndex
from tmu_core.service.import_model import ImportSpec, import_model
from tmu_core.service.server import ServiceConfig, in_process
from tmu_core.serving import InferenceClient, TorchServe
from tmu_core.state.versions import VersionRegistry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served_import(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served_import")
    workspace = make_workspace(tmp)
    make_index(workspace, tmp).close()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        torch.save(get_model("resnet18", weights=None, num_classes=len(CLASSES)).state_dict(), tmp / "w.pt")
    (tmp / "classes.txt").write_text("\n".join(CLASSES))
    imported = import_model(workspace, ImportSpec(model="m", arch="resnet18", weights=tmp / "w.pt",
                                                  classes=tmp / "classes.txt", image_size=SIZE, batch_size=4))
    server = TorchServe(workspace, torchserve_config(workspace.model_store))
    server.start([f"m={imported.package.archive.name}"])
    try:
        server.wait_ready("m", timeout=120)
        yield workspace, server
    finally:
        server.stop()


def test_imported_resnet18_forgets_end_to_end(served_import) -> None:
    workspace, server = served_import
    infer = InferenceClient(server.config.url("inference"), server.keys().inference)
    image = (workspace.home.parent / "tree" / "test" / "a" / "0000.png").read_bytes()
    assert infer.predict("m", image).model_version == "1"
    worker = WorkerSettings(device="cpu", poll_s=0.2, retention_s=3600)  # keep v1 to compare memberships
    with in_process(workspace, ServiceConfig(worker=worker)) as service:
        resp = requests.post(f"{service.url}/forget/m", headers=service.headers(), timeout=30,
                             json={"owner_ids": ["owner-b-1"], "options": FAST_TMU})
        assert resp.status_code == 202, resp.text
        job = _wait(service, resp.json()["job_id"])
        assert job["state"] == "succeeded", job["reason"]
    forgotten = job["sample_ids"]
    assert forgotten == ["train/b/0003", "train/b/0004", "train/b/0005"]
    assert_serving(workspace, server, 2)
    assert infer.predict("m", image).model_version == "2"
    wait_wiped(workspace, forgotten)
    with TrainingIndex.open(workspace.index_dir) as index:
        assert index.verify().ok and all(index.is_forgotten(s) for s in forgotten)
    registry = VersionRegistry(workspace.state_db)
    assert registry.members("m", 2) == registry.members("m", 1) - set(forgotten)
    assert audit_kinds(workspace) == ["forget", "swap", "wipe"]  # audit_kinds verifies the chain
