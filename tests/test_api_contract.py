"""The extension's OpenAPI description is its contract: valid OpenAPI, one error body, and fuzzed against the app.

Schemathesis reads ``/openapi.json`` from the app in process (ASGI, no socket), generates requests from it,
valid and invalid, sends them with the token and runs every one of its checks on each answer: no 5xx, no status
the operation does not list, schema-valid requests accepted, schema-invalid ones refused, answers matching their
documented schema (errors included), auth enforced, 405 with ``Allow`` for undeclared methods. Hand-written cases
test the inputs someone thought of; a generator derives them from the document itself, so every bound the
document states is tried on both sides, and the document cannot drift from the code without a test failing.

Bounded for the default suite: ``CASES`` examples per operation and phase, a fixed seed (``derandomize``), no
example database. ``scripts/fuzz_api.py`` runs the longer version against live servers.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from starlette.testclient import TestClient

from test_service_support import make_index, make_workspace, record_fake_version
from tmu_core.service.app import ServiceState, create_app

KEY = "contract-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {KEY}"}
ERROR_REF = "#/components/schemas/ErrorBody"
CASES = 25
SENT: list[str] = []  # generation mode of each case sent, for the summary line


def _service_state(folder: Path) -> ServiceState:
    workspace = make_workspace(folder)
    index = make_index(workspace, folder, train=6, test=2)
    index.forget(["train/d/0005"], "earlier-request")
    index.close()
    record_fake_version(workspace, "m")
    return ServiceState.open(workspace, KEY)


# Schemathesis parametrizes at collection time, so the app it reads is built on import (a second of work).
_FOLDER = tempfile.TemporaryDirectory(prefix="tmu-contract-")
STATE = _service_state(Path(_FOLDER.name))
APP = create_app(STATE)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
schema.config.update(headers=AUTH)  # the token, known to every check (ignored_auth probes without it)


@pytest.fixture(scope="module")
def client():
    with TestClient(APP, raise_server_exceptions=False) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def spec(client) -> dict:
    return client.get("/openapi.json").json()


@schema.parametrize()
@settings(max_examples=CASES, derandomize=True, database=None, deadline=None,
          suppress_health_check=list(HealthCheck))
def test_every_operation_keeps_its_contract(case) -> None:
    SENT.append(case.meta.generation.mode.value if case.meta is not None else "explicit")
    if case.meta is not None and case.meta.generation.mode.is_positive and isinstance(case.body, dict):
        # Method options are each method's own dataclass fields, ranges checked in code (400, documented);
        # valid random option sets do not exist, so positive bodies keep the method's defaults.
        case.body.pop("options", None)
    case.call_and_validate()


def test_openapi_document_is_valid_openapi(spec) -> None:
    validate(spec)
    assert spec == APP.openapi(), "GET /openapi.json must serve the document the app is built from"
    assert set(spec["paths"]) == {"/health", "/forget", "/forget/{model}", "/requests", "/requests/{request_id}",
                                  "/jobs", "/jobs/{job_id}", "/models/{model}/versions",
                                  "/models/{model}/rollback", "/models/{model}/retrain"}


def _operations(spec: dict):
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            yield f"{method.upper()} {path}", operation


def test_every_error_answer_refers_to_the_one_error_body(spec) -> None:
    assert {"error", "code", "status"} <= set(spec["components"]["schemas"]["ErrorBody"]["required"])
    assert {"unknown_ids", "kind", "error_id"} <= set(spec["components"]["schemas"]["ErrorBody"]["properties"])
    for label, operation in _operations(spec):
        errors = {code: r for code, r in operation["responses"].items() if code[0] in "45"}
        assert "500" in errors, label
        for code, response in errors.items():
            assert response["content"]["application/json"]["schema"] == {"$ref": ERROR_REF}, (label, code)
        if label != "GET /health":
            assert {"401", "403", "422"} <= set(errors) and operation["security"] == [{"bearer": []}], label
        if "requestBody" in operation:
            assert {"400", "413", "422"} <= set(errors), label
    assert not {"HTTPValidationError", "ValidationError"} & set(spec["components"]["schemas"])


def test_bounds_are_in_the_schema(spec) -> None:
    params = {p["name"]: p["schema"] for p in spec["paths"]["/jobs"]["get"]["parameters"]}
    assert params["limit"]["minimum"] == 1 and params["limit"]["maximum"] == 1000
    assert params["state"]["anyOf"][0]["enum"] == ["queued", "running", "succeeded", "failed"]
    body = spec["components"]["schemas"]["ForgetBody"]
    assert body["minProperties"] == 1 and body["additionalProperties"] is False
    assert [alt["required"] for alt in body["anyOf"]] == [["sample_ids"], ["owner_ids"]]
    assert body["properties"]["sample_ids"]["maxItems"] == 10_000
    assert body["properties"]["sample_ids"]["items"]["maxLength"] == 256
    assert "tmu" in body["properties"]["method"]["enum"] and body["examples"]
    assert spec["components"]["schemas"]["RollbackBody"]["properties"]["to_version"]["maximum"] == 2**31 - 1


@pytest.mark.parametrize("path, field", [
    ("/jobs?limit=12946240739269728256", "query.limit"),
    ("/jobs?limit=0", "query.limit"),
    ("/jobs?state=done", "query.state"),
    ("/jobs?model=../etc", "query.model"),
    ("/requests?limit=-1", "query.limit"),
    ("/jobs/fj.x", "path.job_id"),
    ("/requests/" + "f" * 65, "path.request_id"),
    ("/models/a.b/versions", "path.model"),
])
def test_out_of_range_parameters_get_422_naming_the_field(client, path, field) -> None:
    resp = client.get(path, headers=AUTH)
    assert resp.status_code == 422, resp.text
    assert resp.json()["code"] == "invalid_input" and field in resp.json()["error"]


@pytest.mark.parametrize("path, body, field", [
    ("/forget/m", {}, "nothing to forget"),
    ("/forget", {"sample_ids": ["   "]}, "sample_ids.0"),
    ("/forget", {"sample_ids": ["a"], "method": "magic"}, "unknown unlearning method 'magic'"),
    ("/models/m/rollback", {"to_version": 12946240739269728256}, "to_version"),
    ("/models/m/rollback", {"to_version": 2, "undo_forgets": 0}, "undo_forgets"),
    ("/models/m/rollback", {"to_version": "2"}, "to_version"),
])
def test_out_of_range_bodies_get_422_naming_the_field(client, path, body, field) -> None:
    resp = client.post(path, json=body, headers=AUTH)
    assert resp.status_code == 422, resp.text
    assert field in resp.json()["error"]


def test_unknown_routes_and_methods_answer_the_error_body(client) -> None:
    resp = client.get("/nowhere", headers=AUTH)
    assert resp.status_code == 404 and resp.json()["code"] == "not_found" and "/nowhere" in resp.json()["error"]
    resp = client.put("/jobs", headers=AUTH)
    assert resp.status_code == 405 and resp.headers["allow"] == "GET"
    assert resp.json() == {"error": "PUT is not allowed on /jobs; allowed: GET", "code": "method_not_allowed",
                           "status": 405}


def test_an_unexpected_error_is_a_500_with_a_logged_id(client, monkeypatch, caplog) -> None:
    def broken(**_):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(STATE.jobs, "list", broken)
    with caplog.at_level(logging.ERROR, logger="tmu_core.service.app"):
        resp = client.get("/jobs", headers=AUTH)
    body = resp.json()
    assert resp.status_code == 500 and body["code"] == "internal" and body["status"] == 500
    assert "disk on fire" not in body["error"] and body["error_id"] in body["error"]
    logged = [r for r in caplog.records if body["error_id"] in r.getMessage()]
    assert logged and "disk on fire" in logged[0].exc_text


def test_fuzzing_sent_cases() -> None:
    # Runs after the fuzz test (file order); says how much was tried (shown with pytest -rA or -s).
    if SENT:
        assert {"positive", "negative"} <= set(SENT)
        print(f"schemathesis sent {len(SENT)} cases: {SENT.count('positive')} schema-valid, "
              f"{SENT.count('negative')} schema-invalid")
