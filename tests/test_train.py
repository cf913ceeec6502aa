"""Training recipe, loop, inference helpers, checkpoints and ``tmu-admin train`` on tiny synthetic data."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

import tmu_core.cli.train_cmd  # noqa: F401  attaches the command until commands.py imports it
from tmu_core.cli import cli
from tmu_core.errors import CheckpointError, InvalidInputError
from tmu_core.index import TrainingIndex, ingest_image_folder
from tmu_core.models import build_model
from tmu_core.serving.inference import TorchPredictor
from tmu_core.train import (
    CheckpointMeta, TrainConfig, accuracy, channel_stats, extract_features, fit, load_checkpoint,
    predict_logits, save_checkpoint, to_float, train_model,
)
from tmu_core.train.augment import crop_flip

CLASSES = ["a", "b", "c", "d"]


def toy_data(n: int, seed: int = 0, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 noise (N, 3, size, size) with a bright quadrant that gives away the class (4 classes)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 4
    images = (torch.rand(n, 3, size, size, generator=gen) * 100).to(torch.uint8)
    half = size // 2
    for i, label in enumerate(labels.tolist()):
        row, col = divmod(label, 2)
        images[i, :, row * half:(row + 1) * half, col * half:(col + 1) * half] += 120
    return images, labels


def fresh_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model("small_cnn", 4, 3, 16)


def quick_cfg(**overrides) -> TrainConfig:
    return TrainConfig(**{"epochs": 2, "batch_size": 16, "lr": 0.05, "augment": False, "deterministic": True,
                          **overrides})


@pytest.fixture(scope="module")
def tiny_index(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real index built from PNG files: 12 train and 4 test images per class."""
    root = tmp_path_factory.mktemp("folder")
    for split, count, seed in (("train", 48, 0), ("test", 16, 1)):
        images, labels = toy_data(count, seed)
        for i, (image, label) in enumerate(zip(images, labels.tolist())):
            folder = root / split / CLASSES[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:04d}.png")
    dest = tmp_path_factory.mktemp("index") / "index"
    ingest_image_folder(root, dest).close()
    return dest


# --- TrainConfig ---------------------------------------------------------------------------------

def test_paper_and_short_schedules() -> None:
    paper = TrainConfig.paper()
    assert (paper.epochs, paper.lr, paper.milestone_epochs()) == (200, 0.01, [100, 150])
    assert TrainConfig.short(30, augment=False).milestone_epochs() == [15, 22]
    assert TrainConfig(epochs=1).milestone_epochs() == []


def test_recipe_round_trips_through_a_dict() -> None:
    cfg = TrainConfig(epochs=7, milestones=[0.3, 0.6], seed=3)
    assert cfg.milestones == (0.3, 0.6)
    assert TrainConfig.from_dict(asdict(cfg)) == cfg
    with pytest.raises(InvalidInputError, match=r"unknown training recipe keys \['lr_max'\]"):
        TrainConfig.from_dict({**asdict(cfg), "lr_max": 1.0})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"epochs": 0}, "epochs must be an integer >= 1, got 0"),
        ({"batch_size": 1}, "batch_size must be an integer >= 2"),
        ({"lr": 0.0}, r"lr must be in \(0.0, inf\), got 0.0"),
        ({"momentum": 1.0}, r"momentum must be in \[0.0, 1.0\), got 1.0"),
        ({"milestones": (0.75, 0.5)}, "milestones must be increasing fractions"),
        ({"milestones": (0.5, 1.5)}, "milestones must be increasing fractions"),
        ({"label_smoothing": 1.0}, "label_smoothing must be in"),
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"epochs": True}, "epochs must be an integer"),
    ],
)
def test_bad_recipe_raises(overrides: dict, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        TrainConfig(**{"epochs": 1, **overrides})


# --- inference helpers ---------------------------------------------------------------------------

def test_inference_helpers_batch_and_restore_mode() -> None:
    images, labels = toy_data(10)
    model = fresh_model().train()
    logits = predict_logits(model, images, "cpu", batch_size=3)
    assert model.training, "train mode must be restored"
    assert logits.shape == (10, 4) and logits.device.type == "cpu"
    with torch.inference_mode():
        torch.testing.assert_close(logits, model.eval()(to_float(images, "cpu")))
    feats = extract_features(model.train(), images, "cpu", batch_size=4)
    assert feats.shape == (10, 128) and model.training
    expected = 100.0 * (logits.argmax(1) == labels).float().mean().item()
    assert accuracy(model, images, labels, "cpu") == pytest.approx(expected)
    assert predict_logits(model, images[:0], "cpu").shape == (0, 4)


def test_to_float_scales_to_unit_range() -> None:
    x = to_float(torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3), "cpu")
    torch.testing.assert_close(x.flatten(), torch.tensor([0.0, 0.2, 1.0]))


def test_cpu_images_reach_the_model_channels_last_with_the_same_values_and_outputs() -> None:
    images, labels = toy_data(6)
    x = to_float(images, "cpu")
    assert x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    plain = images.float().div(255.0)  # the default (N, C, H, W) order
    assert torch.equal(x, plain)
    model = fresh_model().eval()
    with torch.inference_mode():
        torch.testing.assert_close(model(x), model(plain))

    seen: list[bool] = []  # per forward call: was the input channels-last?
    model.register_forward_pre_hook(lambda _, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    predict_logits(model, images, "cpu")
    fit(model, images, labels, quick_cfg(epochs=1, batch_size=3, augment=True), "cpu")  # 2 batches, cropped
    TorchPredictor(model, torch.device("cpu")).logits(plain)  # the torch serving backend, given plain images
    assert len(seen) == 1 + 2 + 1 and all(seen), seen


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (torch.zeros(2, 3, 16, 16), r"expected a uint8 tensor \(N, C, H, W\), got torch.float32"),
        (torch.zeros(3, 16, 16, dtype=torch.uint8), r"of shape \(3, 16, 16\)"),
        (np.zeros((2, 3, 16, 16), dtype=np.uint8), "got ndarray"),
    ],
)
def test_bad_images_raise(images, message: str) -> None:
    with pytest.raises(InvalidInputError, match=message):
        predict_logits(fresh_model(), images, "cpu")


def test_accuracy_checks_labels() -> None:
    images, _ = toy_data(4)
    with pytest.raises(InvalidInputError, match=r"expected shape \(4,\) to match the images, got \(3,\)"):
        accuracy(fresh_model(), images, torch.zeros(3, dtype=torch.long), "cpu")
    with pytest.raises(InvalidInputError, match="empty set"):
        accuracy(fresh_model(), images[:0], torch.zeros(0, dtype=torch.long), "cpu")


# --- augmentation and the loop -------------------------------------------------------------------

def test_crop_flip_is_seeded_and_keeps_pixels() -> None:
    x = torch.arange(2 * 16, dtype=torch.float32).view(2, 1, 4, 4) + 1
    first = crop_flip(x, 1, torch.Generator().manual_seed(5))
    again = crop_flip(x, 1, torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, again)
    assert first.shape == x.shape
    for i in range(2):  # every pixel is either zero padding or one of the image's own pixels
        values = set(first[i].flatten().tolist()) - {0.0}
        assert values <= set(x[i].flatten().tolist())
    assert not any(torch.equal(crop_flip(x, 1, torch.Generator().manual_seed(s)), first) for s in range(6, 9))


def test_fit_learns_a_learnable_problem() -> None:
    images, labels = toy_data(96)
    test_images, test_labels = toy_data(32, seed=1)
    model = fresh_model()
    before = accuracy(model, test_images, test_labels, "cpu")
    history = fit(model, images, labels, quick_cfg(epochs=4), "cpu", eval_images=test_images,
                  eval_labels=test_labels)
    assert history.epochs == 4 and len(history.eval_acc) == 4 and not model.training
    assert history.eval_acc[-1] >= 90.0 > before
    assert history.loss[-1] < history.loss[0]


def test_fit_with_augmentation_and_schedule_runs() -> None:
    images, labels = toy_data(40)
    history = fit(fresh_model(), images, labels, quick_cfg(epochs=4, augment=True, milestones=(0.5,)), "cpu")
    assert history.lr[0] == pytest.approx(0.05) and history.lr[-1] == pytest.approx(0.005)
    assert all(np.isfinite(history.loss)) and history.eval_acc == ()


def test_same_seed_gives_the_same_weights() -> None:
    images, labels = toy_data(40)
    states = []
    for seed in (0, 0, 1):
        model = fresh_model()
        fit(model, images, labels, quick_cfg(augment=True, seed=seed), "cpu")
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_fit_rejects_bad_input() -> None:
    images, labels = toy_data(8)
    with pytest.raises(InvalidInputError, match="training labels: expected shape"):
        fit(fresh_model(), images, labels[:5], quick_cfg(), "cpu")
    with pytest.raises(InvalidInputError, match="at least 2 images"):
        fit(fresh_model(), images[:1], labels[:1], quick_cfg(), "cpu")
    with pytest.raises(InvalidInputError, match="both eval_images and eval_labels"):
        fit(fresh_model(), images, labels, quick_cfg(), "cpu", eval_images=images)


def test_channel_stats() -> None:
    images = torch.stack([torch.zeros(2, 2, 2), torch.full((2, 2, 2), 255.0)]).to(torch.uint8)  # (2, 2, 2, 2)
    mean, std = channel_stats(images)
    assert mean == pytest.approx((0.5, 0.5)) and std == pytest.approx((0.5, 0.5))


# --- train_model on a real index -----------------------------------------------------------------

def test_train_model_records_how_it_was_made(tiny_index: Path) -> None:
    cfg = quick_cfg(epochs=3)
    with TrainingIndex.open(tiny_index) as index:
        ids = index.ids("train")
        result = train_model(index, ids, "small_cnn", cfg, "cpu", parent="demo:v0")
        again = train_model(index, ids, "small_cnn", cfg, "cpu")
        fingerprint, images = index.fingerprint(ids), index.load(ids)
    meta = result.meta
    assert (meta.arch, meta.class_names, meta.num_classes, meta.in_channels, meta.image_size) == (
        "small_cnn", tuple(CLASSES), 4, 3, 16)
    assert meta.train_size == 48 and meta.index_fingerprint == fingerprint and meta.parent == "demo:v0"
    assert TrainConfig.from_dict(meta.recipe) == cfg and meta.seed == cfg.seed
    assert meta.mean == pytest.approx(channel_stats(images)[0])
    assert result.history.epochs == 3 and not result.model.training
    state, other = result.model.state_dict(), again.model.state_dict()
    assert all(torch.equal(state[k], other[k]) for k in state)


def test_train_model_rejects_a_config_in_place_of_the_arch(tiny_index: Path) -> None:
    with TrainingIndex.open(tiny_index) as index, pytest.raises(InvalidInputError, match="arch must be a model name"):
        train_model(index, index.ids("train"), quick_cfg(), "cpu", "cpu")


# --- checkpoints ---------------------------------------------------------------------------------

def make_meta(**overrides) -> CheckpointMeta:
    fields = {"arch": "small_cnn", "num_classes": 4, "class_names": CLASSES, "in_channels": 3, "image_size": 16,
              "mean": (0.3, 0.4, 0.5), "std": (0.2, 0.2, 0.2), "seed": 0, "recipe": asdict(quick_cfg()),
              "index_fingerprint": "f" * 64, "train_size": 48}
    return CheckpointMeta(**{**fields, **overrides})


def test_checkpoint_round_trip(tmp_path: Path) -> None:
    meta = make_meta(parent="demo:v1")
    torch.manual_seed(0)
    model = build_model("small_cnn", 4, 3, 16, meta.mean, meta.std)
    images, labels = toy_data(16)
    fit(model, images, labels, quick_cfg(epochs=1), "cpu")  # non-trivial batch-norm statistics
    path = save_checkpoint(tmp_path / "v1" / "checkpoint.pt", model, meta)
    loaded, loaded_meta = load_checkpoint(path, "cpu")
    assert loaded_meta == meta and loaded_meta.to_dict() == meta.to_dict()
    assert not loaded.training and loaded.arch == "small_cnn"
    torch.testing.assert_close(predict_logits(loaded, images, "cpu"), predict_logits(model, images, "cpu"))
    assert [p.name for p in path.parent.iterdir()] == ["checkpoint.pt"], "no temp files are left behind"
    payload = torch.load(path, weights_only=True)
    assert set(payload) == {"meta", "state_dict"} and json.dumps(payload["meta"])


def test_meta_dict_is_validated() -> None:
    data = make_meta().to_dict()
    assert CheckpointMeta.from_dict(data) == make_meta(created_at=data["created_at"])
    with pytest.raises(CheckpointError, match=r"missing keys \['arch'\], unknown keys \['colour'\]"):
        CheckpointMeta.from_dict({**{k: v for k, v in data.items() if k != "arch"}, "colour": 1})
    with pytest.raises(CheckpointError, match="num_classes is 5 but 4 class names"):
        CheckpointMeta.from_dict({**data, "num_classes": 5})
    with pytest.raises(InvalidInputError, match=r"mean/std need 3 values"):
        make_meta(mean=(0.5,))


def test_save_refuses_a_model_that_does_not_match_its_meta(tmp_path: Path) -> None:
    model = build_model("small_cnn", 4, 3, 16)
    with pytest.raises(InvalidInputError, match="does not match the meta"):
        save_checkpoint(tmp_path / "c.pt", model, make_meta(arch="allcnn"))
    assert not (tmp_path / "c.pt").exists()


def test_missing_and_corrupt_checkpoints_raise(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "nope.pt", "cpu")
    path = save_checkpoint(tmp_path / "c.pt", build_model("small_cnn", 4, 3, 16, (0.3, 0.4, 0.5), (0.2,) * 3),
                           make_meta())
    path.write_bytes(path.read_bytes()[:300])  # truncated, as after a crash without atomic writes
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        load_checkpoint(path, "cpu")
    torch.save({"weights": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"expected a dict with keys \['meta', 'state_dict'\], got \['weights'\]"):
        load_checkpoint(tmp_path / "other.pt", "cpu")


@pytest.mark.parametrize(
    ("meta_change", "message"),
    [
        ({"num_classes": 5, "class_names": CLASSES + ["e"]}, "weights do not match arch 'small_cnn'"),
        ({"arch": "allcnn"}, "weights do not match arch 'allcnn'"),
        ({"arch": "lenet"}, "cannot rebuild the model from its meta: unknown model architecture 'lenet'"),
        ({"mean": [0.9, 0.9, 0.9]}, "normalisation in the weights"),
    ],
)
def test_meta_state_mismatch_raises(tmp_path: Path, meta_change: dict, message: str) -> None:
    meta = make_meta()
    model = build_model("small_cnn", 4, 3, 16, meta.mean, meta.std)
    torch.save({"meta": {**meta.to_dict(), **meta_change}, "state_dict": model.state_dict()}, tmp_path / "c.pt")
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(tmp_path / "c.pt", "cpu")


# --- tmu-admin train -----------------------------------------------------------------------------

def test_cli_trains_and_writes_the_v1_checkpoint(tiny_index: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    args = ["--home", str(home), "train", "--model", "demo", "--epochs", "2", "--no-augment", "--device", "cpu",
            "--lr", "0.05", "--batch-size", "16", "--index", str(tiny_index), "--no-progress", "--retain-only"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    checkpoint = home / "models" / "demo" / "v1" / "checkpoint.pt"
    assert report["checkpoint"] == str(checkpoint) and checkpoint.is_file()
    assert (report["train_set"], report["train_size"], report["test_size"], report["epochs"]) == ("retained", 48, 16, 2)
    assert 0.0 <= report["train_acc"] <= 100.0 and 0.0 <= report["test_acc"] <= 100.0
    _, meta = load_checkpoint(checkpoint, "cpu")
    assert TrainConfig.from_dict(meta.recipe) == TrainConfig(epochs=2, lr=0.05, batch_size=16, augment=False)
    again = CliRunner().invoke(cli, args)
    assert again.exit_code == 1 and f"checkpoint {checkpoint} already exists; pass --force" in again.output


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--paper-schedule", "--epochs", "3"], 2, "--paper-schedule (200 epochs) and --epochs N conflict"),
        (["--arch", "lenet"], 2, "unknown architecture 'lenet'; valid: allcnn, resnet18, small_cnn, vit_small"),
        (["--model", "../x"], 2, "'../x': use letters, digits"),
        (["--device", "tpu"], 1, "unknown device 'tpu'"),
    ],
)
def test_cli_rejects_bad_options(tiny_index: Path, tmp_path: Path, extra: list[str], code: int, message: str) -> None:
    args = ["--home", str(tmp_path), "train", "--model", "demo", "--index", str(tiny_index), "--no-progress", *extra]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == code and message in result.output, result.output


def test_cli_without_an_index_says_so(tmp_path: Path) -> None:
    result = CliRunner().invoke(cli, ["--home", str(tmp_path), "train", "--model", "demo", "--epochs", "1"])
    assert result.exit_code == 1 and "no training index at" in result.output
