"""End to end on a real TorchServe: an imported torchvision ResNet-18 forgets an owner's samples over HTTP."""

from __future__ import annotations

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from torchvision.models import get_model

from e2e_support import assert_serving, audit_kinds, files_holding, wait_wiped
from test_e2e_forget import _wait
from test_service_support import CLASSES, FAST_TMU, SIZE, make_index, make_workspace, torchserve_config
from tmu_core.forget.dispatcher import WorkerSettings
from tmu_core.index import TrainingIndex, add_images
from tmu_core.service.import_model import ImportSpec, import_model
from tmu_core.service.server import ServiceConfig, in_process
from tmu_core.serving import InferenceClient, TorchServe
from tmu_core.state.versions import VersionRegistry

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served_import(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("served_import")
    workspace = make_workspace(tmp)
    # Photos collected later, of other sizes and modes, appended for owner-b-1: the index becomes mixed-size and
    # the model reads it through its preprocessing.
    with make_index(workspace, tmp) as index:
        folder = tmp / "collected" / "train" / "b"
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).save(folder / "photo1.jpg", quality=90)
        Image.fromarray(rng.integers(0, 256, (50, 20, 4), dtype=np.uint8), "RGBA").save(folder / "photo2.png")
        (tmp / "owners-new.csv").write_text("sample_id,owner_id\ntrain/b/photo1,owner-b-1\ntrain/b/photo2,owner-b-1\n")
        assert add_images(index, tmp / "collected", owners=tmp / "owners-new.csv").image_shape is None
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
        # The dispatcher wipes after the job succeeded: wait while it runs (a queued wipe waits for the next start).
        wait_wiped(workspace, forgotten)
    assert forgotten == ["train/b/0003", "train/b/0004", "train/b/0005", "train/b/photo1", "train/b/photo2"]
    assert_serving(workspace, server, 2)
    assert infer.predict("m", image).model_version == "2"
    photos = [(workspace.home.parent / "collected" / "train" / "b" / name).read_bytes()
              for name in ("photo1.jpg", "photo2.png")]
    assert files_holding([workspace.home, workspace.model_store], photos) == []
    with TrainingIndex.open(workspace.index_dir) as index:
        assert index.verify().ok and all(index.is_forgotten(s) for s in forgotten)
    registry = VersionRegistry(workspace.state_db)
    assert registry.members("m", 2) == registry.members("m", 1) - set(forgotten)
    assert audit_kinds(workspace) == ["forget", "swap", "wipe"]  # audit_kinds verifies the chain
