"""Live: one imported model of each torchvision family, and a stock ``image_classifier`` archive, answer real
photos through a real TorchServe (token auth on) as the model does in process on the same preprocessed tensor.

The weights are random but made informative: BatchNorm statistics are measured on the photos (and noise) and
the head is centred on the photos' features, so the photos fall into different classes (a model answering one
class for everything would prove nothing). Models are registered one at a time and unregistered after their
checks. By default a BatchNorm CNN (mobilenet_v3_small), a LayerNorm transformer (swin_t) and the stock archive
(resnet18) run; the other families (10 to 60 s each on 2 CPU cores, mostly the import's ONNX export and
archive) are marked ``integration_slow``.
"""

from __future__ import annotations

import base64
import io
import json
import threading

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from test_handler_photos import PHOTOS, _bomb_png
from test_models_torchvision import FAMILIES, make_stock_archive
from test_service_support import make_index, make_workspace
from test_torchserve_live import Served, start_on_free_ports
from torchvision.models import get_model

from tmu_core.models.torchvision_import import weights_transforms
from tmu_core.preprocess import Preprocess
from tmu_core.service.import_model import ImportResult, ImportSpec, import_model
from tmu_core.train import load_checkpoint

pytestmark = pytest.mark.integration

SIZE = 32  # the smallest input every family takes (convnext needs 32)
CLASSES = ("ant", "bee", "cat", "dog")
KINDS = ("640x480 JPEG", "RGBA PNG", "greyscale PNG", "EXIF-rotated JPEG", "CMYK JPEG")
BATCH = ("greyscale PNG", "EXIF-rotated JPEG", "CMYK JPEG")  # sent together as a JSON list of base64 images
DEFAULT_FAMILIES = {"mobilenet_v3_small", "swin_t"}
STOCK = "stock"  # the stock archive's model name (a resnet18, see test_models_torchvision.MODEL_FILE)


def _family_params() -> list:
    params = []
    for family in FAMILIES:
        name, head = getattr(family, "values", family)  # plain tuples and pytest.param entries
        marks = () if name in DEFAULT_FAMILIES else (pytest.mark.integration_slow,)
        params.append(pytest.param(name, head, marks=marks, id=name))
    return params


@pytest.fixture(scope="module")
def photos() -> dict[str, bytes]:
    return {kind: PHOTOS[kind]() for kind in KINDS}


def _informative_net(name: str, head: str, photos: dict[str, bytes]) -> torch.nn.Module:
    """A seeded random network whose BatchNorm statistics are measured on the photos and on noise, and whose
    head spreads the photos' features apart.

    The noise is uniform, like the inputs of the import's ONNX check; the logits are kept small (std 0.1 across
    the photos) because that check's tolerance is absolute (1e-4) and float32 rounding alone moves
    regnet_x_400mf's logits by about 1e-4 at std 1.
    """
    extra = {"image_size": SIZE} if name.startswith("vit_") else {}
    transforms = weights_transforms(name)
    pre = Preprocess(size=SIZE, interpolation=transforms.interpolation)
    x01 = torch.stack([pre.apply(Image.open(io.BytesIO(data))) for data in photos.values()]).float() / 255
    mean, std = torch.tensor(transforms.mean).view(1, 3, 1, 1), torch.tensor(transforms.std).view(1, 3, 1, 1)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)  # the weights, and dropout and stochastic depth in the calibration pass
        net = get_model(name, weights=None, num_classes=len(CLASSES), **extra)
        images = (torch.cat([x01, torch.rand(64, 3, SIZE, SIZE)]) - mean) / std
        norms = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        for module in norms:
            module.reset_running_stats()
            module.momentum = None  # a cumulative average over the calibration pass
        if norms:
            net.train()(images)
        linear = net.get_submodule(head)
        captured: list[torch.Tensor] = []
        hook = linear.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
        net.eval()(images[: len(x01)])
        hook.remove()
        feats = captured[0]
        centre = feats.mean(0)
        weight = torch.randn(len(CLASSES), feats.shape[1])
        linear.weight.copy_(weight * 0.1 / ((feats - centre) @ weight.T).std())
        linear.bias.copy_(-linear.weight @ centre)
    return net


def _expected(imported: ImportResult, photos: dict[str, bytes]) -> dict[str, np.ndarray]:
    """Class probabilities of the imported version, run in process on its recorded preprocessing of each photo."""
    model, meta = load_checkpoint(imported.package.checkpoint, "cpu")
    pre = Preprocess.from_meta(meta)
    pixels = torch.stack([pre.apply(Image.open(io.BytesIO(data))) for data in photos.values()])
    with torch.inference_mode():
        probs = torch.softmax(model(pixels.float() / 255), dim=1).numpy()
    return dict(zip(photos, probs))


def _assert_answer(answer: dict, expected: np.ndarray, what: str) -> None:
    top = [p["index"] for p in answer["predictions"]]
    assert top[0] == int(np.argmax(expected)), f"{what}: served top-1 {top[0]}, in process {np.argmax(expected)}"
    by_index = {p["index"]: p["probability"] for p in answer["predictions"]}
    np.testing.assert_allclose([by_index[i] for i in range(len(CLASSES))], expected, atol=1e-4, err_msg=what)


def _post_together(served: Served, path: str, bodies: list[bytes]) -> list[requests.Response]:
    """Send the bodies at once (so TorchServe may batch them); the answers in order."""
    answers: list[requests.Response | None] = [None] * len(bodies)
    barrier = threading.Barrier(len(bodies))

    def send(i: int) -> None:
        barrier.wait()
        answers[i] = served.post(bodies[i], path)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert all(a is not None for a in answers), "a request got no answer in 60 s"
    return answers  # type: ignore[return-value]


def _worker_pids(served: Served, model: str) -> list[int]:
    return [w.pid for info in served.manage().describe(model) for w in info.workers if w.pid]


def _check_photos(served: Served, model: str, imported: ImportResult, photos: dict[str, bytes]) -> None:
    path = f"/predictions/{model}"
    expected = _expected(imported, photos)
    tops = {kind: int(np.argmax(p)) for kind, p in expected.items()}
    assert len(set(tops.values())) >= 2, f"the model answers one class for every photo: {tops}"
    for kind, data in photos.items():
        resp = served.post(data, path)
        assert resp.status_code == 200, f"{kind}: {resp.status_code} {resp.text}"
        _assert_answer(resp.json(), expected[kind], f"{model}, {kind}")
    body = json.dumps([base64.b64encode(photos[kind]).decode() for kind in BATCH]).encode()
    resp = served.post(body, path, **{"Content-Type": "application/json"})
    assert resp.status_code == 200, resp.text
    answers = resp.json()
    assert isinstance(answers, list) and len(answers) == len(BATCH), answers
    for kind, answer in zip(BATCH, answers):
        _assert_answer(answer, expected[kind], f"{model}, {kind} in a batch of {len(BATCH)}")

    workers = _worker_pids(served, model)
    good = photos["640x480 JPEG"]
    bomb, good_resp, truncated = _post_together(served, path, [_bomb_png(), good, good[: len(good) // 3]])
    assert bomb.status_code == 400 and "image refused as a decompression bomb" in bomb.json()["error"], bomb.text
    assert truncated.status_code == 400, truncated.text
    assert "corrupt or unreadable image" in truncated.json()["error"], truncated.text
    assert good_resp.status_code == 200, good_resp.text
    _assert_answer(good_resp.json(), expected["640x480 JPEG"], f"{model}, a good photo beside bad ones")
    resp = served.post(photos["CMYK JPEG"], path)
    assert resp.status_code == 200, resp.text
    _assert_answer(resp.json(), expected["CMYK JPEG"], f"{model}, after the bad photos")
    assert _worker_pids(served, model) == workers, "a worker died on the bad photos"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, photos: dict[str, bytes]):
    """A workspace with a training index, the stock archive imported (torch backend), and TorchServe serving it."""
    tmp = tmp_path_factory.mktemp("families")
    workspace = make_workspace(tmp)
    with make_index(workspace, tmp):
        pass
    (tmp / "classes.txt").write_text("\n".join(CLASSES))
    mar = make_stock_archive(tmp / "stock", _informative_net("resnet18", "fc", photos), CLASSES)
    stock = import_model(workspace, ImportSpec(model=STOCK, mar=mar, image_size=SIZE, backend="torch",
                                               batch_size=4))
    server = start_on_free_ports(workspace, [f"{STOCK}={stock.package.archive.name}"], STOCK)
    try:
        yield workspace, tmp, Served(server, server.keys(), {}), stock
    finally:
        server.stop()


def test_the_imported_stock_archive_answers_photos_as_the_model(live, photos) -> None:
    _, _, served, stock = live
    assert (stock.arch, stock.head) == ("torchvision:resnet18", "fc")
    _check_photos(served, STOCK, stock, photos)


@pytest.mark.parametrize(("name", "head"), _family_params())
def test_each_imported_family_answers_photos_as_the_model(live, photos, name: str, head: str) -> None:
    workspace, tmp, served, _ = live
    weights = tmp / f"{name}.pt"
    torch.save(_informative_net(name, head, photos).state_dict(), weights)
    imported = import_model(workspace, ImportSpec(model=name, arch=name, weights=weights,
                                                  classes=tmp / "classes.txt", image_size=SIZE, batch_size=4))
    assert (imported.arch, imported.head, imported.preprocess["size"]) == (f"torchvision:{name}", head, SIZE)
    manage = served.manage()
    manage.register(imported.package.archive.name, synchronous=True, initial_workers=1)
    try:
        _check_photos(served, name, imported, photos)
    finally:
        manage.unregister(name)
