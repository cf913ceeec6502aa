"""The extension app served for real by uvicorn on a loopback port, with a real index and SQLite file.

The dispatcher is off here, so queued jobs stay queued: these tests are about auth, validation and the API.
"""

from __future__ import annotations

import stat

import pytest
import requests

from test_service_support import make_index, make_workspace, record_fake_version
from tmu_core.state.jobs import JobStore
from tmu_core.service.server import ServiceConfig, in_process, key_path


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("app")
    workspace = make_workspace(tmp)
    index = make_index(workspace, tmp, train=6, test=2)
    index.forget(["train/d/0005"], "earlier-request")
    index.close()
    record_fake_version(workspace, "m")
    with in_process(workspace, ServiceConfig(run_jobs=False)) as running:
        yield workspace, running


@pytest.fixture()
def empty_queue(service):
    workspace, running = service
    store = JobStore(workspace.state_db)
    before = store.count()
    yield workspace, running
    assert store.count() == before, "a bad request reached the job queue"


def _post(running, path: str, body=None, data=None, headers=None):
    hdrs = running.headers() if headers is None else headers
    return requests.post(running.url + path, json=body, data=data, headers=hdrs, timeout=10)


def test_health_and_openapi_need_no_token(service) -> None:
    _, running = service
    assert requests.get(running.url + "/health", timeout=5).json()["status"] == "ok"
    spec = requests.get(running.url + "/openapi.json", timeout=5).json()
    assert "/forget/{model}" in spec["paths"] and "/models/{model}/rollback" in spec["paths"]


def test_key_file_is_private(service) -> None:
    workspace, running = service
    path = key_path(workspace)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == running.key


@pytest.mark.parametrize("headers, status, code", [
    ({}, 401, "unauthorized"),
    ({"Authorization": "Bearer wrong-key"}, 403, "forbidden"),
    ({"Authorization": "Basic abc"}, 401, "unauthorized"),
])
def test_token_required(empty_queue, headers, status, code) -> None:
    _, running = empty_queue
    for method, path in (("post", "/forget/m"), ("get", "/jobs"), ("get", "/models/m/versions")):
        resp = getattr(requests, method)(running.url + path, json={"sample_ids": ["train/a/0000"]},
                                         headers=headers, timeout=10)
        assert resp.status_code == status, (path, resp.text)
        assert resp.json()["code"] == code and resp.json()["status"] == status
        assert "Bearer" in resp.json()["error"] or "token" in resp.json()["error"]
        assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_unknown_model(empty_queue) -> None:
    _, running = empty_queue
    resp = _post(running, "/forget/nope", {"sample_ids": ["train/a/0000"]})
    assert resp.status_code == 404
    assert "'nope'" in resp.json()["error"] and "known models: m" in resp.json()["error"]


def test_unknown_ids_listed(empty_queue) -> None:
    _, running = empty_queue
    resp = _post(running, "/forget/m", {"sample_ids": ["train/a/0000", "zz/1", "zz/2"]})
    assert resp.status_code == 404
    assert resp.json()["unknown_ids"] == ["zz/1", "zz/2"] and resp.json()["kind"] == "sample"
    resp = _post(running, "/forget/m", {"owner_ids": ["owner-a-0", "ghost"]})
    assert resp.status_code == 404 and resp.json()["unknown_ids"] == ["ghost"] and resp.json()["kind"] == "owner"


@pytest.mark.parametrize("body, status, words", [
    ({}, 422, "nothing to forget"),
    ({"sample_ids": [], "owner_ids": []}, 422, "nothing to forget"),
    ({"sample_ids": [" "]}, 422, "sample_ids.0: String should match pattern"),
    ({"sample_ids": "train/a/0000"}, 422, "sample_ids"),
    ({"sample_ids": [""]}, 422, "sample_ids.0: String should have at least 1 character"),
    ({"sample_ids": ["x" * 257]}, 422, "sample_ids.0: String should have at most 256 characters"),
    ({"owner_ids": ["o"] * 10_001}, 422, "owner_ids: List should have at most 10000 items"),
    ({"sample_ids": ["train/a/0000"], "colour": "red"}, 422, "colour"),
    ({"sample_ids": ["train/a/0000"], "options": {"bogus": 1}}, 400, "bogus"),
    ({"sample_ids": ["train/a/0000"], "method": "magic"}, 422, "method: Value error, unknown unlearning method 'magic'"),
])
def test_bad_bodies_are_refused_with_the_field_named(empty_queue, body, status, words) -> None:
    _, running = empty_queue
    for path in ("/forget/m", "/forget"):
        resp = _post(running, path, body)
        assert resp.status_code == status, resp.text
        assert words in resp.json()["error"] and resp.json()["status"] == status


def test_malformed_json_gets_400(empty_queue) -> None:
    _, running = empty_queue
    headers = {**running.headers(), "Content-Type": "application/json"}
    resp = _post(running, "/forget/m", data=b'{"sample_ids": [', headers=headers)
    assert resp.status_code == 400
    assert resp.json()["code"] == "malformed_json" and "not valid JSON" in resp.json()["error"]


def test_unknown_job_and_versions(service) -> None:
    _, running = service
    resp = requests.get(running.url + "/jobs/fj-nope", headers=running.headers(), timeout=5)
    assert resp.status_code == 404 and "fj-nope" in resp.json()["error"]
    resp = requests.get(running.url + "/models/nope/versions", headers=running.headers(), timeout=5)
    assert resp.status_code == 404
    body = requests.get(running.url + "/models/m/versions", headers=running.headers(), timeout=5).json()
    assert body["serving"] == 1 and [v["version"] for v in body["versions"]] == [1]


def test_accepted_request_is_queued_merged_and_idempotent(service) -> None:
    workspace, running = service
    first = _post(running, "/forget/m", {"sample_ids": ["train/a/0001"], "owner_ids": ["owner-b-1"],
                                         "idempotency_key": "k1", "options": {"noise_std": 4.0}})
    assert first.status_code == 202, first.text
    job_id = first.json()["job_id"]
    job = requests.get(running.url + f"/jobs/{job_id}", headers=running.headers(), timeout=5).json()
    assert job["state"] == "queued"
    assert job["sample_ids"] == ["train/a/0001", "train/b/0003", "train/b/0004", "train/b/0005"]
    assert job["options"] == {"method": "tmu", "noise_std": 4.0}
    again = _post(running, "/forget/m", {"sample_ids": ["train/c/0000"], "idempotency_key": "k1"})
    assert again.status_code == 200 and again.json()["job_id"] == job_id and again.json()["existing"]
    merged = _post(running, "/forget/m", {"sample_ids": ["train/c/0000"], "options": {"noise_std": 4.0}})
    assert merged.status_code == 202 and merged.json()["merged_into"] == job_id
    listed = requests.get(running.url + "/jobs", params={"state": "queued"}, headers=running.headers(),
                          timeout=5).json()["jobs"]
    assert {j["id"] for j in listed} >= {job_id, merged.json()["job_id"]}
    assert JobStore(workspace.state_db).get(job_id).merged_from == [merged.json()["job_id"]]


def test_already_forgotten_reported_not_redone(service) -> None:
    _, running = service
    resp = _post(running, "/forget/m", {"sample_ids": ["train/d/0005", "train/d/0000"], "method": "finetune"})
    assert resp.status_code == 202
    assert resp.json()["already_forgotten"] == ["train/d/0005"] and resp.json()["samples"] == 1
    resp = _post(running, "/forget/m", {"sample_ids": ["train/d/0005"]})
    assert resp.status_code == 200
    assert resp.json()["job_id"] is None and resp.json()["already_forgotten"] == ["train/d/0005"]
