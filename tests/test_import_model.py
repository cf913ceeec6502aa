"""``tmu-admin import`` into a workspace, and every unlearning method on imported architectures."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torchvision.models import get_model

from test_models_torchvision import make_stock_archive
from test_service_support import CLASSES, FAST_TMU, SIZE, make_index, make_workspace
from tmu_core.cli import cli
from tmu_core.index import TrainingIndex
from tmu_core.state.versions import VersionRegistry
from tmu_core.train import load_checkpoint
from tmu_core.unlearn import UnlearnData, get_method

QUICK = {"retrain": {"epochs": 1}, "finetune": {"epochs": 1}, "neg_grad": {"epochs": 1},
         "random_label": {"epochs": 1}, "bad_teacher": {}, "fisher": {"samples": 16},
         "scrub": {"epochs": 1, "max_epochs": 1}, "tmu": FAST_TMU}


def _seeded_net(name: str) -> torch.nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return get_model(name, weights=None, num_classes=len(CLASSES))


@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    """A workspace with the 16x16 test index and a resnet18 imported from a state_dict, trained on part of it."""
    tmp = tmp_path_factory.mktemp("imported")
    workspace = make_workspace(tmp)
    with make_index(workspace, tmp) as index:
        trained_on = index.ids("train")[:-4]
    torch.save({"state_dict": _seeded_net("resnet18").state_dict()}, tmp / "weights.pt")
    (tmp / "classes.txt").write_text("\n".join(CLASSES))
    (tmp / "ids.txt").write_text("\n".join(trained_on))
    result = CliRunner().invoke(cli, ["--home", str(workspace.home), "--model-store", str(workspace.model_store),
                                      "import", "--model", "tv", "--arch", "resnet18", "--weights",
                                      str(tmp / "weights.pt"), "--classes", str(tmp / "classes.txt"),
                                      "--image-size", str(SIZE), "--trained-on", str(tmp / "ids.txt")])
    assert result.exit_code == 0, result.output
    return workspace, tmp, trained_on, json.loads(result.output)


def test_import_packages_a_recorded_version(imported) -> None:
    workspace, _, trained_on, out = imported
    assert (out["model"], out["version"], out["arch"], out["head"]) == ("tv", 1, "torchvision:resnet18", "fc")
    assert out["preprocess"] == {"size": SIZE, "resize": None, "channels": 3, "interpolation": "bilinear"}
    assert out["trained_on"] == len(trained_on) and Path(out["archive"]).is_file()
    registry = VersionRegistry(workspace.state_db)
    assert registry.serving("tv").version == 1 and registry.members("tv", 1) == set(trained_on)
    model, meta = load_checkpoint(out["checkpoint"], "cpu")
    assert meta.arch == "torchvision:resnet18" and meta.class_names == CLASSES and meta.image_size == SIZE
    assert meta.mean == pytest.approx((0.485, 0.456, 0.406)) and meta.recipe["imported"]["head"] == "fc"
    net = _seeded_net("resnet18").eval()
    x01 = torch.rand(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(model(x01), net((x01 - model.mean) / model.std), rtol=1e-4, atol=1e-5)


def test_import_refuses_ids_the_index_lacks(imported) -> None:
    workspace, tmp, _, _ = imported
    (tmp / "bad.txt").write_text("train/a/0000\ntrain/z/9999\n")
    result = CliRunner().invoke(cli, ["--home", str(workspace.home), "--model-store", str(workspace.model_store),
                                      "import", "--model", "tv2", "--arch", "resnet18", "--weights",
                                      str(tmp / "weights.pt"), "--classes", str(tmp / "classes.txt"),
                                      "--image-size", str(SIZE), "--trained-on", str(tmp / "bad.txt")])
    assert result.exit_code == 1 and "train/z/9999" in result.output


def test_import_of_a_stock_archive(imported) -> None:
    workspace, tmp, _, _ = imported
    mar = make_stock_archive(tmp / "stock", _seeded_net("resnet18"))
    result = CliRunner().invoke(cli, ["--home", str(workspace.home), "--model-store", str(workspace.model_store),
                                      "import", "--model", "stock", "--mar", str(mar), "--image-size", str(SIZE),
                                      "--backend", "torch"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.output)
    assert out["arch"] == "torchvision:resnet18" and out["trained_on"] == 48  # the whole training split
    _, meta = load_checkpoint(out["checkpoint"], "cpu")
    assert meta.class_names == ("a", "b", "c", "d") and meta.recipe["imported"]["class"] == "ImageClassifier"


# BatchNorm by default; LayerNorm (swin_t, about 100 s for all methods on 2 CPU cores) marked slow.
# convnext_tiny needs inputs of at least 32 px; the test index holds 16 px images.
@pytest.mark.parametrize("arch", ["resnet18", pytest.param("swin_t", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", sorted(QUICK))
def test_every_method_runs_on_imported_models(imported, arch: str, method: str) -> None:
    workspace, _, trained_on, out = imported
    from tmu_core.models.torchvision_import import build_torchvision

    model = build_torchvision(arch, len(CLASSES), 3, SIZE).eval()
    _, meta = load_checkpoint(out["checkpoint"], "cpu")
    meta = meta.__class__(**{**meta.to_dict(), "arch": model.arch})
    with TrainingIndex.open(workspace.index_dir) as index:
        data = UnlearnData(index, forget_ids=tuple(trained_on[:3]), retain_ids=tuple(trained_on[3:]),
                           twin_ids=tuple(index.ids("test")))
        before = {k: v.clone() for k, v in model.state_dict().items()}
        outcome = get_method(method, **QUICK[method]).unlearn(model, meta, data, torch.device("cpu"), None)
    assert outcome.model is not model and outcome.model.arch == model.arch
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    logits = outcome.model.eval()(torch.rand(2, 3, SIZE, SIZE))
    assert logits.shape == (2, len(CLASSES)) and torch.isfinite(logits).all()
