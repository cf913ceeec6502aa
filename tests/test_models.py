"""Model registry, the four architectures, and ONNX export parity."""

from __future__ import annotations

import io

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tmu_core.errors import InvalidInputError
from tmu_core.models import Classifier, build_model, count_parameters, list_models, register_model
from tmu_core.models.vit import choose_patch_size

ARCHS = ["small_cnn", "resnet18", "allcnn", "vit_small"]


def _images(n: int, channels: int = 3, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def test_registry_lists_all_architectures() -> None:
    assert set(ARCHS) <= set(list_models())
    assert list_models() == sorted(list_models())


def test_unknown_arch_lists_valid_names() -> None:
    with pytest.raises(InvalidInputError, match=r"unknown model architecture 'lenet'; valid: .*small_cnn"):
        build_model("lenet", 4)


def test_duplicate_registration_raises() -> None:
    with pytest.raises(InvalidInputError, match="'small_cnn' is already registered"):
        register_model("small_cnn")(lambda **kw: None)


@pytest.mark.parametrize("name", ["", "SmallCNN", "small cnn", "a/b"])
def test_bad_registry_name_raises(name: str) -> None:
    with pytest.raises(InvalidInputError, match="model name must be lowercase"):
        register_model(name)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 1}, "num_classes must be an int >= 2"),
        ({"num_classes": 4, "in_channels": 0}, "in_channels must be an int >= 1"),
        ({"num_classes": 4, "mean": (0.5, 0.5)}, r"mean needs one value per channel \(3\), got 2"),
        ({"num_classes": 4, "std": (0.2, 0.0, 0.2)}, "std values must all be > 0"),
    ],
)
def test_bad_build_arguments_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        build_model("small_cnn", **kwargs)


def test_normalisation_lives_in_the_model() -> None:
    mean, std = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)
    model = build_model("small_cnn", 4, image_size=16, mean=mean, std=std).eval()
    x = _images(2)
    expected = model.trunk((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    torch.testing.assert_close(model.features(x), expected)
    assert set(dict(model.named_buffers())) >= {"mean", "std"}


@pytest.mark.parametrize("arch", ARCHS)
def test_architecture_builds_and_trains_one_step(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, num_classes=4, in_channels=3, image_size=16)
    assert isinstance(model, Classifier) and isinstance(model.head, nn.Linear)
    assert model.arch == arch and model.head.out_features == 4
    x, labels = _images(4), torch.tensor([0, 1, 2, 3])
    feats = model.features(x)
    assert feats.shape == (4, model.feature_dim) == (4, model.head.in_features)
    torch.testing.assert_close(model(x), model.head(feats))
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = F.cross_entropy(model(x), labels)
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    changed = sum(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert changed == len(before)


def test_parameter_counts_are_in_the_expected_range() -> None:
    counts = {arch: count_parameters(build_model(arch, 10, image_size=32)) for arch in ARCHS}
    assert 120_000 <= counts["small_cnn"] <= 160_000
    assert 11_000_000 <= counts["resnet18"] <= 11_300_000
    assert counts["small_cnn"] < counts["allcnn"] < counts["resnet18"]


@pytest.mark.parametrize(("channels", "size"), [(1, 8), (3, 5), (3, 40), (1, 1)])
def test_small_cnn_takes_any_size(channels: int, size: int) -> None:
    model = build_model("small_cnn", 10, in_channels=channels, image_size=size).eval()
    assert model(_images(2, channels, size)).shape == (2, 10)


@pytest.mark.parametrize(("arch", "channels", "size"), [("allcnn", 1, 8), ("vit_small", 1, 8)])
def test_small_digits_images_work(arch: str, channels: int, size: int) -> None:
    model = build_model(arch, 10, in_channels=channels, image_size=size).eval()
    assert model(_images(2, channels, size)).shape == (2, 10)


def test_vit_rejects_another_image_size() -> None:
    model = build_model("vit_small", 4, image_size=16)
    with pytest.raises(InvalidInputError, match=r"built for 16x16 images, got \(32, 32\)"):
        model(_images(1, size=32))


@pytest.mark.parametrize(("size", "patch"), [(32, 4), (16, 4), (8, 2), (30, 2), (7, 1)])
def test_vit_patch_size_divides_the_image(size: int, patch: int) -> None:
    assert choose_patch_size(size) == patch


def _onnx_logits(model: nn.Module, x: torch.Tensor) -> np.ndarray:
    buffer = io.BytesIO()
    torch.onnx.export(
        model, (x[:1],), buffer, dynamo=False, input_names=["input"], output_names=["logits"],
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input": x.numpy()})[0]


@pytest.mark.parametrize("arch", ARCHS)
def test_onnx_export_matches_torch(arch: str) -> None:
    torch.manual_seed(0)
    model = build_model(arch, 4, image_size=16, mean=(0.5, 0.4, 0.3), std=(0.2, 0.3, 0.25)).eval()
    x = _images(3, seed=1)  # a batch of 3 through a graph exported with batch 1: the batch axis is dynamic
    with torch.inference_mode():
        expected = model(x).numpy()
    got = _onnx_logits(model, x)
    assert got.shape == (3, 4)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-3)
