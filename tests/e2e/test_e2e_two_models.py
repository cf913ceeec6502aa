"""Two models trained on overlapping data owners, served by one real TorchServe: a forget reaches both.

Model ``a`` is trained on classes a and b, model ``b`` on classes b, c and d, so the owners of class b are in
both. A request about data fans out to both; the pixels are wiped only after the last of them committed; and
at the end no file under the workspace or the model store holds a forgotten image's bytes or a feature row
computed from it.
"""

from __future__ import annotations

import time

import pytest
import requests
import torch

from e2e_support import files_holding
from test_service_support import FAST_TMU, make_index, make_v1, make_workspace, torchserve_config
from tmu_core.forget.artifacts import artifacts_dir, prepare_version
from tmu_core.forget.intake import ForgetRequest
from tmu_core.forget.pipeline import PipelineConfig, run_job
from tmu_core.forget.submit import request_view, submit_request
from tmu_core.forget.wipe import sweep
from tmu_core.index import TrainingIndex
from tmu_core.serving import TorchServe
from tmu_core.state.store import StateStore

pytestmark = pytest.mark.integration

RUN = PipelineConfig(device="cpu", prepare_next=False)


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    workspace = make_workspace(tmp)
    with make_index(workspace, tmp) as index:
        train = index.ids("train")
    make_v1(workspace, "a", epochs=3, trained_on=[i for i in train if i.split("/")[1] in "ab"])
    make_v1(workspace, "b", epochs=3, trained_on=[i for i in train if i.split("/")[1] in "bcd"])
    server = TorchServe(workspace, torchserve_config(workspace.model_store))
    server.start(["a=a-v1.mar", "b=b-v1.mar"])
    try:
        server.wait_ready("a", timeout=120)
        server.wait_ready("b", timeout=120)
        yield workspace, server
    finally:
        server.stop()


def _encoded(workspace, ids: list[str]) -> list[bytes]:
    """The stored (encoded) bytes of each sample, read from the index's blob file."""
    with TrainingIndex.open(workspace.index_dir) as index:
        records = index.lookup(ids)
    blob = (workspace.index_dir / "blobs.bin").read_bytes()
    return [blob[r.offset:r.offset + r.length] for r in records]


def _feature_rows(workspace, model: str, version: int, ids: list[str]) -> list[bytes]:
    """The raw float32 bytes of the prepared penultimate-feature rows of ``ids``."""
    stored = torch.load(artifacts_dir(workspace, model, version) / "train_features.pt", weights_only=True)
    rows = [stored["ids"].index(i) for i in ids]
    return [stored["features"][row].contiguous().numpy().tobytes() for row in rows]


def _run(workspace, store: StateStore, model: str) -> None:
    job = store.jobs.claim_next(model)
    assert job is not None, f"no queued job for {model}"
    done = run_job(workspace, job.id, RUN)
    assert done.state == "succeeded", done.reason


def test_a_request_about_data_reaches_every_model_and_leaves_no_copy(two) -> None:
    workspace, server = two
    store = StateStore.open(workspace)
    with TrainingIndex.open(workspace.index_dir) as index:
        owned = index.ids_for_owners(["owner-b-0"])
    asked = owned + ["test/b/0000"]
    for model in ("a", "b"):
        prepare_version(workspace, model, options=FAST_TMU, device="cpu")
    needles = _encoded(workspace, asked) + _feature_rows(workspace, "a", 1, owned) + \
        _feature_rows(workspace, "b", 1, owned)
    assert len(files_holding([workspace.home, workspace.model_store], needles)) >= len(needles)

    answer, created = submit_request(workspace, store, ForgetRequest(owner_ids=("owner-b-0",),
                                                                     sample_ids=("test/b/0000",),
                                                                     options=FAST_TMU), None)
    assert created and sorted(j["model"] for j in answer["jobs"]) == ["a", "b"]
    _run(workspace, store, "a")
    sweep(workspace)
    with TrainingIndex.open(workspace.index_dir) as index:
        assert not any(index.is_forgotten(i) for i in owned)  # model b still has to unlearn them
        assert index.is_forgotten("test/b/0000")  # no model trains on it; the prepared state was rebuilt
    assert request_view(store, store.requests.get(answer["request_id"]))["state"] == "pending"

    _run(workspace, store, "b")
    assert store.jobs.get(answer["jobs"][1]["job_id"]).result["samples"] == len(owned)  # none dropped
    sweep(workspace)
    assert request_view(store, store.requests.get(answer["request_id"]))["state"] == "succeeded"
    for model in ("a", "b"):
        serving = store.versions.require_serving(model)
        assert serving.version == 2 and not store.versions.members(model, 2) & set(owned)
        assert store.versions.get(model, 1).state == "purged"
        assert_serving_model(server, model, 2)
    with TrainingIndex.open(workspace.index_dir) as index:
        assert all(index.is_forgotten(i) for i in asked) and index.verify().ok
    assert files_holding([workspace.home, workspace.model_store], needles) == []
    assert store.audit.verify().ok


def assert_serving_model(server, model: str, version: int) -> None:
    from tmu_core.service import swap

    client = server.management()
    assert swap.default_version(client, model) == str(version)
    assert swap.registered_versions(client, model) == {str(version)}


def test_a_forget_of_one_model_does_not_hide_the_samples_from_another(two) -> None:
    """After model a forgot an owner, model b is still asked to (it was not, before), with every sample."""
    workspace, _ = two
    store = StateStore.open(workspace)
    with TrainingIndex.open(workspace.index_dir) as index:
        owned = index.ids_for_owners(["owner-b-1"])
    first, _ = submit_request(workspace, store, ForgetRequest(owner_ids=("owner-b-1",), options=FAST_TMU), "a")
    _run(workspace, store, "a")
    sweep(workspace)
    with TrainingIndex.open(workspace.index_dir) as index:
        assert not any(index.is_forgotten(i) for i in owned)
    second, created = submit_request(workspace, store, ForgetRequest(owner_ids=("owner-b-1",), options=FAST_TMU),
                                     "b")
    assert created and second["samples"] == len(owned) and second["state"] == "pending"
    _run(workspace, store, "b")
    sweep(workspace)
    with TrainingIndex.open(workspace.index_dir) as index:
        assert all(index.is_forgotten(i) for i in owned)
    assert first["request_id"] != second["request_id"]


def test_forget_over_http_fans_out_and_finishes(two) -> None:
    from tmu_core.forget.dispatcher import WorkerSettings
    from tmu_core.service.server import ServiceConfig, in_process

    workspace, server = two
    store = StateStore.open(workspace)
    before = {m: store.versions.require_serving(m).version for m in ("a", "b")}
    config = ServiceConfig(worker=WorkerSettings(device="cpu", poll_s=0.2))
    with in_process(workspace, config) as service:
        resp = requests.post(f"{service.url}/forget", headers=service.headers(), timeout=30,
                             json={"owner_ids": ["owner-b-2"], "options": FAST_TMU, "idempotency_key": "k-two"})
        assert resp.status_code == 202, resp.text
        request_id = resp.json()["request_id"]
        again = requests.post(f"{service.url}/forget", headers=service.headers(), timeout=30,
                              json={"owner_ids": ["owner-b-2"], "idempotency_key": "k-two"})
        assert again.status_code == 200 and again.json()["request_id"] == request_id
        deadline = time.monotonic() + 240
        while True:
            view = requests.get(f"{service.url}/requests/{request_id}", headers=service.headers(), timeout=10).json()
            if view["state"] != "pending" or time.monotonic() > deadline:
                break
            time.sleep(0.5)
    assert view["state"] == "succeeded", view
    assert sorted(j["model"] for j in view["jobs"]) == ["a", "b"] and view["pending_wipe"] == 0
    for model in ("a", "b"):
        serving = store.versions.require_serving(model).version
        assert serving > before[model]
        assert_serving_model(server, model, serving)
