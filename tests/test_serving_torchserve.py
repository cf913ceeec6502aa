"""TorchServe settings, server bookkeeping without a server, and the clients' error mapping over real HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tmu_core.config import Workspace
from tmu_core.errors import AuthError, InvalidInputError, ModelNotFoundError, ServerError
from tmu_core.serving.clients import InferenceClient, ManagementClient
from tmu_core.serving.torchserve import TorchServe, TorchServeConfig, free_ports

REPO = Path(__file__).resolve().parents[1]


def test_properties_are_loopback_with_token_auth_and_model_api(tmp_path):
    config = TorchServeConfig(model_store=tmp_path, inference_port=9001, management_port=9002, metrics_port=9003)
    props = dict(line.split("=", 1) for line in config.properties().splitlines() if "=" in line)
    assert props["inference_address"] == "http://127.0.0.1:9001"
    assert props["management_address"] == "http://127.0.0.1:9002"
    assert props["metrics_address"] == "http://127.0.0.1:9003"
    assert props["grpc_inference_address"] == props["grpc_management_address"] == "127.0.0.1"
    assert (props["grpc_inference_port"], props["grpc_management_port"]) == ("7070", "7071")
    assert props["disable_token_authorization"] == "false"
    assert props["enable_model_api"] == "true"
    assert props["model_store"] == str(tmp_path)


def test_the_repository_config_properties_reads_back(tmp_path):
    config = TorchServeConfig.from_properties(REPO / "config.properties", tmp_path)
    assert (config.inference_port, config.management_port, config.metrics_port) == (8080, 8081, 8082)
    assert (config.grpc_inference_port, config.grpc_management_port) == (7070, 7071)
    assert config.token_auth and config.enable_model_api
    assert config.default_workers_per_model == 1
    assert config.model_store == tmp_path


def test_written_properties_round_trip(tmp_path):
    config = TorchServeConfig.with_free_ports(tmp_path, token_auth=False, token_expiration_min=5)
    again = TorchServeConfig.from_properties(config.write(tmp_path / "c.properties"), tmp_path)
    assert again == config


def test_a_non_loopback_address_is_refused(tmp_path):
    path = tmp_path / "c.properties"
    path.write_text("inference_address=http://0.0.0.0:8080\n")
    with pytest.raises(InvalidInputError, match=r"inference_address must be http://127.0.0.1:<port>, got 'http://0.0.0.0:8080'"):
        TorchServeConfig.from_properties(path, tmp_path)
    path.write_text("grpc_management_address=0.0.0.0\n")
    with pytest.raises(InvalidInputError, match=r"grpc_management_address must be 127.0.0.1, got '0.0.0.0'"):
        TorchServeConfig.from_properties(path, tmp_path)


def test_ports_must_be_distinct(tmp_path):
    with pytest.raises(InvalidInputError, match=r"5 distinct ports .* got \(8080, 8080, 8082, 7070, 7071\)"):
        TorchServeConfig(model_store=tmp_path, inference_port=8080, management_port=8080)


def test_free_ports_are_distinct_and_below_the_ephemeral_range():
    ports = free_ports(5)
    assert len(set(ports)) == 5 and all(20000 <= p < 32768 for p in ports)


def test_a_server_that_never_ran(tmp_path):
    workspace = Workspace(home=tmp_path / "home", model_store=tmp_path / "store")
    server = TorchServe(workspace, TorchServeConfig.with_free_ports(workspace.model_store))
    assert server.pid() is None
    assert server.stop() is False
    status = server.status()
    assert not status.running and status.key_file is None and status.models == ()
    with pytest.raises(ServerError, match="cannot read TorchServe keys from .*key_file.json"):
        server.keys()
    with pytest.raises(InvalidInputError, match=r"model 'tiny=missing.mar': expected NAME=FILE.mar with FILE in"):
        server.start(["tiny=missing.mar"])


class _Stub(BaseHTTPRequestHandler):
    """Answers like TorchServe: status and JSON body chosen by the request path."""

    answers = {
        "/models/ghost": (404, {"code": 404, "type": "ModelNotFoundException", "message": "Model not found: ghost"}),
        "/models/busy": (500, {"code": 500, "type": "InternalServerException", "message": "Worker died"}),
        "/predictions/tiny": (400, {"error": "image 1 of 1: empty body"}),
        "/predictions/locked": (400, {"code": 400, "type": "InvalidKeyException",
                                      "message": "Token Authorization failed. Token either incorrect"}),
        "/models": (200, {"models": [{"modelName": "a", "modelUrl": "a-v1.mar"}], "nextPageToken": "1"}),
    }

    def _answer(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        path = self.path.split("?")[0]
        if path == "/models" and "next_page_token=1" in self.path:
            code, body = 200, {"models": [{"modelName": "b", "modelUrl": "b-v2.mar"}]}
        else:
            code, body = self.answers.get(path, (404, {"message": f"no route {path}"}))
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    do_GET = do_POST = do_PUT = do_DELETE = _answer

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def stub_url() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Stub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_management_errors_are_mapped(stub_url):
    client = ManagementClient(stub_url, "k")
    with pytest.raises(ModelNotFoundError, match="GET /models/ghost: TorchServe answered 404: Model not found: ghost"):
        client.describe("ghost")
    with pytest.raises(ServerError, match="answered 500: Worker died"):
        client.unregister("busy")


def test_list_models_follows_pages(stub_url):
    assert [m.name for m in ManagementClient(stub_url, None).list_models()] == ["a", "b"]


def test_inference_errors_are_mapped(stub_url):
    client = InferenceClient(stub_url, "k")
    with pytest.raises(InvalidInputError, match="POST /predictions/tiny: image 1 of 1: empty body"):
        client.predict("tiny", b"")
    with pytest.raises(AuthError, match="Token Authorization failed"):
        client.predict("locked", b"x")


def test_an_unreachable_server_is_a_server_error():
    (port,) = free_ports(1)
    with pytest.raises(ServerError, match=f"cannot reach the TorchServe management API at http://127.0.0.1:{port}"):
        ManagementClient(f"http://127.0.0.1:{port}", None, timeout=2).list_models()


def test_a_workspace_too_deep_for_unix_sockets_is_refused(tmp_path):
    deep = tmp_path / ("d" * 120)
    workspace = Workspace(home=deep, model_store=tmp_path / "store")
    with pytest.raises(InvalidInputError, match="a Unix socket path may hold 107 bytes"):
        TorchServe(workspace, TorchServeConfig.with_free_ports(workspace.model_store)).start([])
