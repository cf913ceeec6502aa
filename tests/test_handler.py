"""The TorchServe handler, in process: a fake Context, initialize(), handle() on real payloads."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from handler.tmu_handler import TmuHandler
from tmu_core.errors import InvalidInputError
from tmu_core.models import build_model
from tmu_core.serving.export import export_onnx
from tmu_core.train import CheckpointMeta, save_checkpoint

CLASSES = ("ant", "bee", "cat", "dog")
SIZE = 16


class FakeContext:
    """The parts of ts.context.Context the handler uses; records per-item statuses."""

    def __init__(self, model_dir: Path, yaml_config: dict, gpu_id: int | None = None, version: str = "3") -> None:
        self.system_properties = {"model_dir": str(model_dir), "gpu_id": gpu_id, "batch_size": 8}
        self.manifest = {"model": {"modelName": "tiny", "modelVersion": version}}
        self.model_yaml_config = yaml_config
        self.metrics = None
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("unpacked")
    torch.manual_seed(0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = build_model("small_cnn", len(CLASSES), 3, SIZE, mean, std)
    meta = CheckpointMeta("small_cnn", len(CLASSES), CLASSES, 3, SIZE, mean, std, 0, {}, "fp", 10)
    save_checkpoint(folder / "checkpoint.pt", model, meta)
    (folder / "meta.json").write_text(json.dumps(meta.to_dict()))
    export_onnx(model.eval(), meta, folder / "model.onnx")
    return folder


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    from tmu_core.train import load_checkpoint

    model, _ = load_checkpoint(model_dir / "checkpoint.pt", "cpu")

    def probs(pixels_hwc: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.array(pixels_hwc)).permute(2, 0, 1)[None].float() / 255
        with torch.inference_mode():
            return torch.softmax(model(x), dim=1)[0].numpy()

    return probs


def _handler(model_dir: Path, backend: str = "onnx", **settings) -> tuple[TmuHandler, FakeContext]:
    ctx = FakeContext(model_dir, {"handler": {"backend": backend, **settings}})
    handler = TmuHandler()
    handler.initialize(ctx)
    return handler, ctx


def _pixels(seed: int, size: int = SIZE, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, channels), dtype=np.uint8)


def _encode(pixels: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels.squeeze()).save(buf, fmt)
    return buf.getvalue()


def _check_answer(answer: dict, expected_probs: np.ndarray, k: int = 4) -> None:
    assert answer["model_version"] == "3"
    preds = answer["predictions"]
    assert len(preds) == k
    order = np.argsort(-expected_probs)[:k]
    assert [p["index"] for p in preds] == order.tolist()
    assert [p["class"] for p in preds] == [CLASSES[i] for i in order]
    np.testing.assert_allclose([p["probability"] for p in preds], expected_probs[order], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", ["onnx", "torch"])
def test_png_body_matches_the_model(model_dir, reference, backend):
    handler, ctx = _handler(model_dir, backend)
    pixels = _pixels(1)
    out = handler.handle([{"body": _encode(pixels)}], ctx)
    assert len(out) == 1 and ctx.statuses == {}
    _check_answer(out[0], reference(pixels))


def test_jpeg_body_is_decoded_like_pil(model_dir, reference):
    handler, ctx = _handler(model_dir)
    data = _encode(_pixels(2), "JPEG")
    decoded = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    out = handler.handle([{"data": bytearray(data)}, {"file": data}], ctx)  # body, or a form's only field
    assert ctx.statuses == {} and out[0] == out[1]
    _check_answer(out[0], reference(decoded))


def test_base64_json_parsed_by_torchserve_or_raw(model_dir, reference):
    handler, ctx = _handler(model_dir)
    pixels = _pixels(3)
    b64 = base64.b64encode(_encode(pixels)).decode()
    items = [{"body": {"image": b64}}, {"body": json.dumps({"image": "data:image/png;base64," + b64}).encode()}]
    out = handler.handle(items, ctx)
    assert ctx.statuses == {}
    for answer in out:
        _check_answer(answer, reference(pixels))


def test_nested_lists_hwc_chw_and_floats(model_dir, reference):
    handler, ctx = _handler(model_dir)
    pixels = _pixels(4)
    items = [
        {"body": pixels.tolist()},                                   # (H, W, C) ints
        {"body": {"image": pixels.transpose(2, 0, 1).tolist()}},     # (C, H, W) ints
        {"body": (pixels.astype(np.float64) / 255).tolist()},        # floats in [0, 1]
        {"body": json.dumps(pixels.tolist()).encode()},              # the same as raw JSON bytes
    ]
    out = handler.handle(items, ctx)
    assert ctx.statuses == {}
    for answer in out:
        _check_answer(answer, reference(pixels))


def test_onnx_and_torch_backends_agree(model_dir):
    items = [{"body": _encode(_pixels(seed))} for seed in range(5)]
    onnx_handler, onnx_ctx = _handler(model_dir, "onnx")
    torch_handler, torch_ctx = _handler(model_dir, "torch")
    for a, b in zip(onnx_handler.handle(items, onnx_ctx), torch_handler.handle(items, torch_ctx)):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        np.testing.assert_allclose([p["probability"] for p in a["predictions"]],
                                   [p["probability"] for p in b["predictions"]], atol=1e-5)


def test_one_bad_item_gets_its_own_400_and_the_rest_are_answered(model_dir, reference):
    handler, ctx = _handler(model_dir)
    good = [_pixels(10), _pixels(11), _pixels(12)]
    items = [{"body": _encode(good[0])}, {"body": b"not an image at all"}, {"body": _encode(good[1])},
             {"body": _encode(good[2])}]
    out = handler.handle(items, ctx)
    assert len(out) == 4
    assert list(ctx.statuses) == [1]
    assert ctx.statuses[1] == (400, "Bad Request")
    message = out[1]["error"]
    assert message.startswith("image 2 of 4: expected image bytes")
    assert "got 19 bytes starting b'not an i'" in message
    assert out[1] == {"error": message}
    for answer, pixels in zip((out[0], out[2], out[3]), good):
        _check_answer(answer, reference(pixels))


BAD_ITEMS = {
    "empty body": ({"body": b""}, "empty body"),
    "missing body": ({"body": None}, "empty body"),
    "text, not an image": ({"body": "hello"}, "got 5 bytes starting b'hello'"),
    "bad JSON": ({"body": b'{"image": '}, "bad JSON"),
    "bad base64": ({"body": {"image": "@@not base64@@"}}, "'image' is not valid base64"),
    "base64 of text": ({"body": {"image": base64.b64encode(b"plain text").decode()}}, "got 10 bytes starting b'plain te'"),
    "no image key": ({"body": {"picture": "x"}}, "needs the key 'image'"),
    "instances": ({"body": {"instances": ["x"]}}, "send {\"images\": [...]} for several"),
    "JSON number": ({"body": {"image": 7}}, "'image' must be a base64 string"),
    "wrong list size": ({"body": np.zeros((8, 8, 3), dtype=int).tolist()}, "pixel lists are not resized"),
    "corrupt JPEG": ({"body": b"\xff\xd8\xff" + b"\x00" * 50}, "got 53 bytes starting"),
    "ragged lists": ({"body": [[1, 2], [3]]}, "ragged"),
    "strings in lists": ({"body": [["a"] * SIZE] * SIZE}, "numbers only"),
    "ints out of range": ({"body": np.full((SIZE, SIZE, 3), 300).tolist()}, "int pixels must be in 0..255"),
    "floats out of range": ({"body": np.full((3, SIZE, SIZE), 1.5).tolist()}, "float pixels must be finite"),
    "two form fields": ({"a": b"1", "b": b"2"}, "form fields ['a', 'b']; send the image as the body"),
    "wrong list shape": ({"body": np.zeros((SIZE, SIZE)).tolist()}, "shape (16, 16), the model accepts (3, 16, 16)"),
}


@pytest.mark.parametrize("name", sorted(BAD_ITEMS))
def test_every_bad_input_kind_is_a_400_with_a_clear_message(model_dir, name):
    item, fragment = BAD_ITEMS[name]
    handler, ctx = _handler(model_dir)
    out = handler.handle([item, {"body": _encode(_pixels(6))}], ctx)
    assert len(out) == 2
    assert ctx.statuses[0] == (400, "Bad Request")
    message = out[0]["error"]
    assert message.startswith("image 1 of 2: ")
    assert fragment in message
    assert out[0] == {"error": message}
    assert 1 not in ctx.statuses and len(out[1]["predictions"]) == 4


def test_oversized_payload_is_refused(model_dir):
    handler, ctx = _handler(model_dir, max_bytes=100)
    out = handler.handle([{"body": _encode(_pixels(7))}], ctx)
    assert ctx.statuses[0][0] == 400
    assert "over the limit of 100 bytes" in out[0]["error"]


def test_top_k_comes_from_the_yaml_and_is_capped(model_dir):
    handler, ctx = _handler(model_dir, top_k=2)
    assert len(handler.handle([{"body": _encode(_pixels(8))}], ctx)[0]["predictions"]) == 2
    handler, ctx = _handler(model_dir, top_k=50)
    assert len(handler.handle([{"body": _encode(_pixels(8))}], ctx)[0]["predictions"]) == len(CLASSES)


def test_bad_settings_fail_initialize_with_the_accepted_ones(model_dir):
    with pytest.raises(InvalidInputError, match=r"unknown handler settings \['topk'\]"):
        _handler(model_dir, topk=3)
    with pytest.raises(InvalidInputError, match=r"backend must be one of \['onnx', 'torch'\]"):
        _handler(model_dir, backend="tensorrt")


def test_onnx_asks_for_cuda_only_when_onnxruntime_offers_it(model_dir):
    import onnxruntime as ort

    ctx = FakeContext(model_dir, {"handler": {"backend": "onnx"}}, gpu_id=0)
    handler = TmuHandler()
    handler.initialize(ctx)
    providers = handler.service.predictor.providers
    assert providers[-1] == "CPUExecutionProvider"
    assert ("CUDAExecutionProvider" in providers) == ("CUDAExecutionProvider" in ort.get_available_providers())


def test_handle_before_initialize_is_a_503():
    from ts.utils.util import PredictionException

    with pytest.raises(PredictionException) as err:
        TmuHandler().handle([{"body": b"x"}], None)
    assert err.value.error_code == 503


@pytest.mark.gpu
def test_torch_backend_runs_on_the_workers_gpu(model_dir, reference):
    ctx = FakeContext(model_dir, {"handler": {"backend": "torch"}}, gpu_id=0)
    handler = TmuHandler()
    handler.initialize(ctx)
    assert handler.service.predictor.device == torch.device("cuda:0")
    pixels = _pixels(9)
    out = handler.handle([{"body": _encode(pixels)}], ctx)
    assert [p["index"] for p in out[0]["predictions"]] == np.argsort(-reference(pixels)).tolist()
