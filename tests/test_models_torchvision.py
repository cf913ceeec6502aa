"""Imported torchvision architectures: one model of each family, strict weight loading, the head, stock archives."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torchvision.models import get_model

from tmu_core.errors import InvalidInputError
from tmu_core.models import build_model
from tmu_core.models.stock_mar import parse_class_names, read_stock_archive
from tmu_core.models.torchvision_import import build_torchvision, find_head, weights_transforms

SIZE = 32
# (architecture, head it must find). vit_b_16 (8 s) and swin_t (7 s) on 2 CPU cores are marked slow.
FAMILIES = [
    ("resnet18", "fc"),
    ("mobilenet_v3_small", "classifier.3"),
    ("efficientnet_b0", "classifier.1"),
    ("regnet_x_400mf", "fc"),
    ("convnext_tiny", "classifier.2"),
    ("densenet121", "classifier"),
    pytest.param("vit_b_16", "heads.head", marks=pytest.mark.slow),
    pytest.param("swin_t", "head", marks=pytest.mark.slow),
]


def _net(name: str, classes: int = 4) -> nn.Module:
    extra = {"image_size": SIZE} if name.startswith("vit_") else {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_model(name, weights=None, num_classes=classes, **extra).eval()


@pytest.mark.parametrize(("name", "head"), FAMILIES)
def test_each_family_imports_with_its_weights(name: str, head: str) -> None:
    net = _net(name)
    model = build_torchvision(name, 4, 3, SIZE, state_dict=net.state_dict()).eval()
    x01 = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        expected = net((x01 - model.mean) / model.std)
        feats = model.features(x01)
        logits = model(x01)
    assert model.arch == f"torchvision:{name}" and model.head_path == head
    assert feats.shape == (2, model.head.in_features)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    rebuilt = build_model(f"torchvision:{name}", 4, 3, SIZE)  # the registry rebuilds it, keys match
    rebuilt.load_state_dict(model.state_dict(), strict=True)


def test_normalisation_and_preprocess_come_from_the_weights_metadata() -> None:
    resnet, effnet = weights_transforms("resnet18"), weights_transforms("efficientnet_b0")
    assert (resnet.crop, resnet.resize, resnet.interpolation) == (224, 256, "bilinear")
    assert resnet.mean == (0.485, 0.456, 0.406) and resnet.std == (0.229, 0.224, 0.225)
    assert (effnet.crop, effnet.resize, effnet.interpolation) == (224, 256, "bicubic")
    model = build_torchvision("resnet18", 4, 3, SIZE)
    assert model.mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])


def test_mismatched_weights_name_missing_unexpected_and_shapes() -> None:
    state = _net("resnet18", classes=10).state_dict()
    del state["layer1.0.bn1.running_mean"]
    state["extra.weight"] = torch.zeros(1)
    with pytest.raises(InvalidInputError) as info:
        build_torchvision("resnet18", 4, 3, SIZE, state_dict=state)
    assert str(info.value) == (
        "weights do not fit torchvision resnet18: missing keys ['layer1.0.bn1.running_mean']; unexpected keys "
        "['extra.weight']; shapes differ: ['fc.bias: file (10,) vs model (4,)', "
        "'fc.weight: file (10, 512) vs model (4, 512)']")


def test_unknown_architecture_lists_supported() -> None:
    with pytest.raises(InvalidInputError, match=r"unknown torchvision architecture 'alexnet'; supported: .*resnet18"):
        build_model("torchvision:alexnet", 4)


class _TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(1), nn.Linear(3 * 8 * 8, 16), nn.ReLU())
        self.fc_a, self.fc_b = nn.Linear(16, 4), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.body(x)
        return (self.fc_a(feats) + self.fc_b(feats)) / 2


def test_ambiguous_head_names_the_candidates() -> None:
    with pytest.raises(InvalidInputError) as info:
        find_head(_TwoHeads(), 4, torch.rand(2, 3, 8, 8))
    assert "candidates with 4 outputs are ['fc_a', 'fc_b'], and none of them is the last layer" in str(info.value)


def test_no_linear_with_the_class_count() -> None:
    with pytest.raises(InvalidInputError, match=r"no nn.Linear with 7 outputs .* linear layers: \['body.1 \(192->16\)'"):
        find_head(_TwoHeads(), 7, torch.rand(2, 3, 8, 8))


@pytest.mark.parametrize(("text", "names"), [
    ("cat\ndog\n\n", ("cat", "dog")), ('["cat", "dog"]', ("cat", "dog")),
    ('{"1": ["n2", "dog"], "0": ["n1", "cat"]}', ("cat", "dog")), ('{"0": "cat", "1": "dog"}', ("cat", "dog")),
])
def test_class_name_files(text: str, names: tuple[str, ...]) -> None:
    assert parse_class_names(text, "classes") == names


def test_class_name_file_errors() -> None:
    with pytest.raises(InvalidInputError, match=r"class indices must be 0..1, got \[0, 2\]"):
        parse_class_names('{"0": "a", "2": "b"}', "c")
    with pytest.raises(InvalidInputError, match=r"class names repeat: \['a'\]"):
        parse_class_names("a\na\n", "c")


MODEL_FILE = """from torchvision.models.resnet import ResNet, BasicBlock


class ImageClassifier(ResNet):
    def __init__(self):
        super(ImageClassifier, self).__init__(BasicBlock, [2, 2, 2, 2], num_classes=4)
"""


def make_stock_archive(folder: Path, net: nn.Module, classes: tuple[str, ...] = ("a", "b", "c", "d")) -> Path:
    """A stock image_classifier archive, built by torch-model-archiver as TorchServe users do."""
    from model_archiver.model_archiver_config import ModelArchiverConfig
    from model_archiver.model_packaging import package_model
    from model_archiver.model_packaging_utils import ModelExportUtils

    folder.mkdir(parents=True, exist_ok=True)
    torch.save(net.state_dict(), folder / "resnet18.pth")
    (folder / "model.py").write_text(MODEL_FILE)
    (folder / "index_to_name.json").write_text(json.dumps({str(i): ["n0", c] for i, c in enumerate(classes)}))
    fields = dict(model_name="stock", handler="image_classifier", version="1.0", model_file=str(folder / "model.py"),
                  serialized_file=str(folder / "resnet18.pth"), extra_files=str(folder / "index_to_name.json"),
                  export_path=str(folder))
    config = ModelArchiverConfig(**fields)
    package_model(config, manifest=ModelExportUtils.generate_manifest_json(config))
    return folder / "stock.mar"


def test_stock_archive_finds_arch_weights_and_classes(tmp_path: Path) -> None:
    net = _net("resnet18")
    stock = read_stock_archive(make_stock_archive(tmp_path, net))
    assert (stock.arch, stock.model_class, stock.handler) == ("resnet18", "ImageClassifier", "image_classifier")
    assert stock.class_names == ("a", "b", "c", "d")
    assert all(torch.equal(stock.state_dict[k], v) for k, v in net.state_dict().items())


def test_stock_archive_without_class_names(tmp_path: Path) -> None:
    path = tmp_path / "bad.mar"
    with zipfile.ZipFile(path, "w") as mar:
        mar.writestr("w.pth", b"")
    with pytest.raises(InvalidInputError, match=r"no index_to_name.json in the archive .*files: \['w.pth'\]"):
        read_stock_archive(path)


def test_import_cli_refuses_conflicting_flags(tmp_path: Path) -> None:
    from tmu_core.cli import cli

    weights = tmp_path / "w.pt"
    weights.write_bytes(b"x")
    result = CliRunner().invoke(cli, ["--home", str(tmp_path / "h"), "import", "--model", "m", "--weights",
                                      str(weights), "--mar", str(weights)])
    assert result.exit_code == 2 and "give --weights (with --arch and --classes) or --mar" in result.output
