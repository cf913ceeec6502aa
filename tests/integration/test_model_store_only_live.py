"""A real TorchServe registers archives of the model store by file name, and refuses file:// and http:// URLs."""

from __future__ import annotations

import functools
import shutil
import threading
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from tmu_core.config import Workspace
from tmu_core.errors import ModelNotFoundError
from tmu_core.models import build_model
from tmu_core.serving.archive import package_version
from tmu_core.serving.torchserve import TorchServe, TorchServeConfig
from tmu_core.train import CheckpointMeta, save_checkpoint

pytestmark = pytest.mark.integration


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("store_only")
    workspace = Workspace(home=root / "home", model_store=root / "store")
    torch.manual_seed(0)
    model = build_model("small_cnn", 2, 3, 8).eval()
    meta = CheckpointMeta("small_cnn", 2, ("x", "y"), 3, 8, (0.0,) * 3, (1.0,) * 3, 0, {}, "fp", 2)
    ckpt = save_checkpoint(root / "m.pt", model, meta)
    for version in (1, 2):
        package_version(ckpt, workspace, "m", version, backend="torch", batch_size=1, max_batch_delay=1)
    outside = root / "outside"  # an attacker's archives, outside the model store
    outside.mkdir()
    shutil.copy(workspace.model_store / "m-v2.mar", outside / "evil.mar")
    zipfile.ZipFile(outside / "evil.mar").extractall(outside / "unpacked")
    files = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_Quiet, directory=str(outside)))
    threading.Thread(target=files.serve_forever, daemon=True).start()
    server = TorchServe(workspace, TorchServeConfig.with_free_ports(workspace.model_store))
    try:
        server.start(["m=m-v1.mar"])
        server.wait_ready("m", timeout=120)
        yield server, outside, f"http://127.0.0.1:{files.server_address[1]}"
    finally:
        server.stop()
        files.shutdown()
        files.server_close()


@pytest.mark.parametrize("where", ["file", "http", "file_in_store"])
def test_a_url_is_refused(served, where):
    server, outside, files_url = served
    url = {"file": (outside / "evil.mar").as_uri(), "http": f"{files_url}/evil.mar",
           "file_in_store": (server.config.model_store / "m-v2.mar").as_uri()}[where]
    with pytest.raises(ModelNotFoundError, match=f"Given URL {url} does not match any allowed URL"):
        server.management().register(url, model_name=f"evil_{where}", timeout=60)
    assert "evil.mar" not in {p.name for p in server.config.model_store.iterdir()}
    assert f"evil_{where}" not in {m.name for m in server.management().list_models()}


def test_a_file_name_in_the_model_store_registers(served):
    server, _, _ = served
    client = server.management()
    assert "registered" in client.register("m-v2.mar", model_name="m", timeout=120)
    assert {info.version for info in client.describe("m", "all")} == {"1", "2"}
    client.unregister("m", 2)


@pytest.mark.xfail(strict=True, reason="TorchServe 0.12 loads an absolute path to an unpacked model folder "
                                       "without checking allowed_urls")
def test_an_unpacked_folder_outside_the_store_is_refused(served):
    server, outside, _ = served
    try:
        with pytest.raises(ModelNotFoundError):
            server.management().register(str(outside / "unpacked"), model_name="evil_dir", timeout=60)
    finally:
        if "evil_dir" in {m.name for m in server.management().list_models()}:
            server.management().unregister("evil_dir")
