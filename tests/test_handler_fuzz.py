"""Generated request bodies against the prediction side, in process: the ``ClassifierService`` the handler wraps.

Whatever a batch holds (random bytes, truncated or corrupted JPEG/PNG, headers claiming huge images, odd JSON,
good images mixed in), the service answers once per item, in order; an item that is not an image the model takes
gets a 400 whose message names it; a good one gets its predictions; and no exception escapes. Bounded for the
default suite (fixed seed, no example database); ``scripts/fuzz_api.py`` runs more examples.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from tmu_core.models import build_model
from tmu_core.serving.inference import ClassifierService
from tmu_core.train import CheckpointMeta, save_checkpoint

CLASSES = ("ant", "bee", "cat", "dog")
SIZE = 16
EXAMPLES = 60
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> ClassifierService:
    folder = tmp_path_factory.mktemp("fuzz-model")
    torch.manual_seed(0)
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = build_model("small_cnn", len(CLASSES), 3, SIZE, mean, std)
    meta = CheckpointMeta("small_cnn", len(CLASSES), CLASSES, 3, SIZE, mean, std, 0, {}, "fp", 10)
    save_checkpoint(folder / "checkpoint.pt", model, meta)
    (folder / "meta.json").write_text(json.dumps(meta.to_dict()))
    return ClassifierService.from_model_dir(Path(folder), {"handler": {"backend": "torch", "top_k": 2}}, None, "1")


def _encode(pixels: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt)
    return buf.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG signature and IHDR that claim ``width`` x ``height`` RGB, followed by no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk


pixels = st.integers(0, 2**32 - 1).map(
    lambda seed: np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
good_images = st.builds(_encode, pixels, st.sampled_from(["PNG", "JPEG"]))

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner,
                                                                                        max_size=5),
                           max_leaves=20)


@st.composite
def truncated(draw) -> bytes:
    data = draw(good_images)
    return data[:draw(st.integers(0, len(data) // 2))]


@st.composite
def wrong_size(draw) -> bytes:
    width, height = draw(st.integers(1, 60000)), draw(st.integers(1, 60000))
    if (width, height) == (SIZE, SIZE):
        width += 1
    return _png_header(width, height)


# Each of these is never an image the model takes: every one must be answered 400.
bad_payloads = st.one_of(
    st.binary(max_size=300).filter(lambda b: not b.startswith((b"\xff\xd8\xff", b"\x89PNG"))),
    truncated(),
    wrong_size(),
    json_values,
    json_values.map(lambda v: json.dumps(v).encode()),
    json_values.map(lambda v: {"image": v}),
    st.text(max_size=40).map(lambda t: {"image": t}),
    st.binary(max_size=64).map(lambda b: json.dumps({"image": b.hex()}).encode()),
)


def _check(results, items, expect_bad: set[int]) -> None:
    assert len(results) == len(items)
    for idx, result in enumerate(results):
        if idx in expect_bad:
            assert result.status == 400, (idx, result)
            assert f"image {idx + 1} of {len(items)}" in result.body["error"]
        elif result.status == 200:
            preds = result.body["predictions"]
            assert len(preds) == 2 and preds[0]["class"] in CLASSES and result.body["model_version"] == "1"
        else:
            assert result.status == 400 and result.body["error"].startswith(f"image {idx + 1} of ")


@FUZZ
@given(payload=bad_payloads, key=st.sampled_from(["body", "data"]))
def test_every_bad_payload_gets_its_own_400(service, payload, key) -> None:
    _check(service.answer([{key: payload}]), [payload], {0})


@FUZZ
@given(batch=st.lists(st.tuples(st.booleans(), good_images, bad_payloads), min_size=1, max_size=6))
def test_a_mixed_batch_is_answered_item_by_item(service, batch) -> None:
    items = [{"body": good if keep else bad} for keep, good, bad in batch]
    results = service.answer(items)
    _check(results, items, {idx for idx, (keep, _, _) in enumerate(batch) if not keep})
    assert all(results[idx].status == 200 for idx, (keep, _, _) in enumerate(batch) if keep)


@FUZZ
@given(data=good_images, flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(1, 255)), min_size=1,
                                        max_size=8))
def test_corrupted_images_never_escape(service, data, flips) -> None:
    corrupted = bytearray(data)
    for where, mask in flips:
        corrupted[where % len(corrupted)] ^= mask
    # A flipped byte may leave a decodable JPEG (it has no checksum): then it is predicted, else a 400.
    _check(service.answer([{"body": bytes(corrupted)}]), [corrupted], set())


class _Context:
    """The parts of TorchServe's Context that ``TmuHandler.handle`` uses."""

    def __init__(self) -> None:
        self.metrics = None
        self.statuses: dict[int, tuple[int, str]] = {}

    def set_response_status(self, code: int = 200, phrase: str = "", idx: int = 0) -> None:
        self.statuses[idx] = (code, phrase)


@settings(FUZZ, max_examples=EXAMPLES // 2)
@given(batch=st.lists(st.tuples(st.booleans(), good_images, bad_payloads), min_size=1, max_size=4))
def test_the_handler_sets_a_400_per_bad_item(service, batch) -> None:
    from handler.tmu_handler import TmuHandler

    handler, context = TmuHandler(), _Context()
    handler.service = service
    items = [{"body": good if keep else bad} for keep, good, bad in batch]
    answers = handler.handle(items, context)
    assert len(answers) == len(items)
    bad = {idx for idx, (keep, _, _) in enumerate(batch) if not keep}
    assert context.statuses == {idx: (400, "Bad Request") for idx in bad}
    assert all(isinstance(answers[idx]["error"], str) and answers[idx]["error"] for idx in bad)


def _read_frame(frame: bytes) -> list[tuple[int, str, bytes]]:
    """Parse a predict response the way TorchServe's frontend does (every length in bytes).

    Returns (status, reason phrase, body) per request; fails when a length does not land on the frame's end.
    """
    pos = 0

    def read_int() -> int:
        nonlocal pos
        (value,) = struct.unpack_from("!i", frame, pos)
        pos += 4
        return value

    def read_bytes() -> bytes:
        nonlocal pos
        size = read_int()
        assert 0 <= size <= len(frame) - pos, f"field of {size} bytes at {pos} runs past the frame"
        pos += size
        return frame[pos - size:pos]

    read_int(), read_bytes()  # batch status, message
    answers = []
    while (id_size := read_int()) != -1:
        pos += id_size
        read_bytes()  # content type
        status, phrase = read_int(), read_bytes().decode("utf-8")
        for _ in range(read_int()):
            read_bytes(), read_bytes()
        answers.append((status, phrase, read_bytes()))
    assert pos == len(frame), f"{len(frame) - pos} bytes left after the end marker"
    return answers


@settings(FUZZ, max_examples=EXAMPLES // 2)
@given(batch=st.lists(st.tuples(st.booleans(), good_images, bad_payloads), min_size=1, max_size=4))
def test_torchserve_frames_every_answer_intact(service, batch) -> None:
    """The worker's reply, framed by TorchServe's own code, parses whatever the bad items' messages quote."""
    from ts.context import Context, RequestProcessor
    from ts.protocol.otf_message_handler import create_predict_response

    from handler.tmu_handler import TmuHandler

    handler = TmuHandler()
    handler.service = service
    items = [{"body": good if keep else bad} for keep, good, bad in batch]
    req_ids = {idx: f"req-{idx}" for idx in range(len(items))}
    context = Context("m", "/tmp", {}, 4, None, "1")
    context.request_processor = [RequestProcessor({}) for _ in items]
    answers = handler.handle(items, context)
    framed = _read_frame(bytes(create_predict_response(answers, req_ids, "Prediction success", 200, context)))
    assert [status for status, _, _ in framed] == [200 if keep else 400 for keep, _, _ in batch]
    assert [json.loads(body) for _, _, body in framed] == answers

