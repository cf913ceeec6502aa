"""A real TorchServe on loopback with token auth on: predictions, batches, bad input, versions, stop."""

from __future__ import annotations

import base64
import io
import json
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from tmu_core.config import Workspace
from tmu_core.errors import AuthError, ConflictError, InvalidInputError, ServerError
from tmu_core.models import build_model
from tmu_core.serving.archive import package_version
from tmu_core.serving.clients import InferenceClient, ManagementClient
from tmu_core.serving.torchserve import TorchServe, TorchServeConfig, TokenKeys, pid_alive
from tmu_core.train import CheckpointMeta, save_checkpoint

pytestmark = pytest.mark.integration

CLASSES = ("ant", "bee", "cat", "dog")
MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


@dataclass
class Served:
    server: TorchServe
    keys: TokenKeys
    models: dict[int, torch.nn.Module]

    @property
    def url(self) -> str:
        return self.server.config.url("inference")

    def infer(self) -> InferenceClient:
        return InferenceClient(self.url, self.keys.inference)

    def manage(self) -> ManagementClient:
        return ManagementClient(self.server.config.url("management"), self.keys.management)

    def post(self, data: bytes, path: str = "/predictions/tiny", **headers: str) -> requests.Response:
        headers.setdefault("Authorization", f"Bearer {self.keys.inference}")
        return requests.post(self.url + path, data=data, headers=headers, timeout=30)


def start_on_free_ports(workspace: Workspace, models: list[str], ready: str) -> TorchServe:
    """Start and wait for READY; once more on new ports if another process took a port meanwhile."""
    for attempt in (1, 2):
        server = TorchServe(workspace, TorchServeConfig.with_free_ports(workspace.model_store))
        server.start(models)
        try:
            server.wait_ready(ready, timeout=120)
            return server
        except ServerError as err:
            server.stop()
            if attempt == 2 or "Address already in use" not in str(err):
                raise
    raise AssertionError("unreachable")


def _checkpoint(folder: Path, seed: int) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(seed)
    model = build_model("small_cnn", len(CLASSES), 3, 16, MEAN, STD).eval()
    meta = CheckpointMeta("small_cnn", len(CLASSES), CLASSES, 3, 16, MEAN, STD, seed, {}, "fp", 10)
    return save_checkpoint(folder / f"seed{seed}.pt", model, meta), model


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("ts")
    workspace = Workspace(home=root / "home", model_store=root / "store")
    ckpt1, model1 = _checkpoint(root, 1)
    ckpt2, model2 = _checkpoint(root, 2)
    # v1 waits up to 250 ms to fill a batch of 4, so concurrent requests share one batch.
    package_version(ckpt1, workspace, "tiny", 1, backend="onnx", batch_size=4, max_batch_delay=250,
                    max_bytes=4096)
    package_version(ckpt2, workspace, "tiny", 2, backend="torch", batch_size=4, max_batch_delay=5)
    server = start_on_free_ports(workspace, ["tiny=tiny-v1.mar"], "tiny")
    try:
        yield Served(server, server.keys(), {1: model1, 2: model2})
    finally:
        server.stop()


def _png(seed: int, size: int = 16) -> tuple[bytes, np.ndarray]:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG")
    return buf.getvalue(), pixels


def _expected(model: torch.nn.Module, pixels: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(pixels.copy()).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        return torch.softmax(model(x), dim=1)[0].numpy()


def test_a_png_prediction_matches_the_model(served):
    data, pixels = _png(0)
    answer = served.infer().predict("tiny", data)
    expected = _expected(served.models[1], pixels)
    assert answer.model_version == "1"
    assert [p.index for p in answer.predictions] == np.argsort(-expected).tolist()
    assert [p.name for p in answer.predictions] == [CLASSES[i] for i in np.argsort(-expected)]
    np.testing.assert_allclose([p.probability for p in answer.predictions], np.sort(expected)[::-1], atol=1e-5)


def test_json_base64_and_pixel_lists_over_http(served):
    data, pixels = _png(1)
    expected_top = int(np.argmax(_expected(served.models[1], pixels)))
    bodies = [json.dumps({"image": base64.b64encode(data).decode()}), json.dumps(pixels.tolist()),
              json.dumps({"image": (pixels.transpose(2, 0, 1) / 255).tolist()})]
    for body in bodies[:2]:
        resp = served.post(body.encode(), **{"Content-Type": "application/json"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["predictions"][0]["index"] == expected_top
    # Float pixel lists are bigger than v1's 4096-byte limit: refused with the limit named.
    resp = served.post(bodies[2].encode(), **{"Content-Type": "application/json"})
    assert resp.status_code == 400 and "over the limit of 4096 bytes" in resp.json()["error"]


def test_a_batch_with_a_malformed_item(served):
    bodies = [_png(10)[0], b"definitely not an image", _png(11)[0], _png(12)[0]]
    results: list[requests.Response | None] = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        barrier.wait()
        results[i] = served.post(bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200, 400, 200, 200]
    error = results[1].json()["error"]
    match = re.match(r"image (\d) of (\d): expected image bytes", error)
    assert match, error
    assert int(match.group(2)) >= 2, f"the bad item was not batched with others: {error}"
    assert "got 23 bytes starting b'definite'" in error
    for resp in (results[0], results[2], results[3]):
        assert resp.json()["model_version"] == "1" and len(resp.json()["predictions"]) == 4


@pytest.mark.parametrize(("body", "content_type", "fragment"), [
    (b"", "application/octet-stream", "empty body"),
    (b"hello", "text/plain", "got 5 bytes starting b'hello'"),
    (b'{"image": "%%%"}', "application/json", "'image' is not valid base64"),
    (b'{"image": [1, 2', "application/json", "bad JSON"),
    (None, "image/png", "corrupt or unreadable image"),  # a truncated PNG
])
def test_bad_inputs_get_400_with_a_message(served, body, content_type, fragment):
    data = _png(3)[0][:60] if body is None else body
    resp = served.post(data, **{"Content-Type": content_type})
    assert resp.status_code == 400, resp.text
    assert fragment in resp.json()["error"]
    with pytest.raises(InvalidInputError, match=re.escape(fragment)):
        served.infer().predict("tiny", data, content_type=content_type)


def test_a_message_quoting_non_ascii_input_keeps_the_worker_alive(served):
    """The error quotes the client's characters; the reply must still reach the client and the worker live."""
    workers = [w.pid for info in served.manage().describe("tiny", "1") for w in info.workers if w.pid]
    for _ in range(3):
        resp = served.post('{"image": "ü¦å\u00e9"}'.encode(), **{"Content-Type": "application/json"})
        assert resp.status_code == 400, resp.text
        assert "'image' is not valid base64" in resp.json()["error"] and "ü" in resp.json()["error"]
    assert served.post(_png(4)[0]).status_code == 200
    assert [w.pid for info in served.manage().describe("tiny", "1") for w in info.workers if w.pid] == workers


def test_a_wrong_or_missing_token_is_refused(served):
    data = _png(4)[0]
    assert 400 <= served.post(data, Authorization="Bearer wrong").status_code < 500
    assert 400 <= requests.post(served.url + "/predictions/tiny", data=data, timeout=30).status_code < 500
    with pytest.raises(AuthError, match="Token Authorization failed"):
        InferenceClient(served.url, "wrong").predict("tiny", data)
    with pytest.raises(AuthError):
        ManagementClient(served.server.config.url("management"), served.keys.inference).list_models()


def test_register_a_second_version_and_make_it_the_default(served):
    manage = served.manage()
    manage.register("tiny-v2.mar", synchronous=True, initial_workers=1)
    versions = {info.version: info for info in manage.describe("tiny", "all")}
    assert sorted(versions) == ["1", "2"] and versions["2"].ready and versions["2"].batch_size == 4
    data, pixels = _png(5)
    assert served.infer().predict("tiny", data).model_version == "1"  # a new version is not the default
    answer = served.infer().predict("tiny", data, version=2)
    assert answer.model_version == "2"
    assert answer.predictions[0].index == int(np.argmax(_expected(served.models[2], pixels)))
    manage.set_default("tiny", 2)
    assert served.infer().predict("tiny", data).model_version == "2"
    with pytest.raises(ConflictError, match="Cannot remove default version"):
        manage.unregister("tiny", 2)  # the default version cannot go while others exist
    manage.unregister("tiny", 1)
    assert [info.version for info in manage.describe("tiny", "all")] == ["2"]


def test_stop_ends_the_java_process_and_its_workers(served):
    pid = served.server.pid()
    workers = [w.pid for info in served.manage().describe("tiny", "all") for w in info.workers if w.pid]
    assert pid is not None and workers
    assert served.server.stop() is True
    assert not pid_alive(pid)
    assert served.server.pid() is None and not served.server.status().running
    assert not any(pid_alive(w) for w in workers)
