"""Builders shared by the service tests (no tests here): a tiny workspace, index, and model versions.

The index holds 4 classes of 3x16x16 PNG images (a smooth class pattern plus noise, so a model can learn them),
with training samples grouped into data owners of three.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from tmu_core.config import Workspace
from tmu_core.state.versions import VersionRecord, VersionRegistry

CLASSES = ("a", "b", "c", "d")
SIZE = 16
OWNER_GROUP = 3
# Cheap TMU settings for tests: a few epochs and steps, same code paths as the defaults.
FAST_TMU = {"twin_epochs": 2, "cf_epochs": 1, "clf_epochs": 5, "max_steps": 3, "af_steps": 1,
            "batch_size": 64}


def make_workspace(tmp_path: Path) -> Workspace:
    return Workspace(home=tmp_path / "home", model_store=tmp_path / "model_store")


def _png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_tree(root: Path, train: int, test: int, seed: int = 0) -> list[str]:
    """ImageFolder tree with learnable classes; returns the train sample ids."""
    gen = torch.Generator().manual_seed(seed)
    coarse = torch.rand(len(CLASSES), 3, 4, 4, generator=gen)
    protos = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False) * 200 + 25
    train_ids = []
    for split, count in (("train", train), ("test", test)):
        for label, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for n in range(count):
                img = (protos[label] + torch.randn(3, SIZE, SIZE, generator=gen) * 30).clamp(0, 255)
                pixels = img.to(torch.uint8).permute(1, 2, 0).numpy()
                (folder / f"{n:04d}.png").write_bytes(_png(pixels))
                if split == "train":
                    train_ids.append(f"train/{name}/{n:04d}")
    return train_ids


def owners_of(train_ids: list[str]) -> dict[str, str]:
    """Group training samples into owners of OWNER_GROUP: ``owner-<class>-<k>``."""
    mapping = {}
    for sample_id in train_ids:
        _, name, stem = sample_id.split("/")
        mapping[sample_id] = f"owner-{name}-{int(stem) // OWNER_GROUP}"
    return mapping


def make_index(workspace: Workspace, tmp_path: Path, train: int = 12, test: int = 6):
    """Build ``workspace.index_dir``; returns the open index."""
    from tmu_core.index import ingest_image_folder

    tree = tmp_path / "tree"
    train_ids = write_tree(tree, train, test)
    return ingest_image_folder(tree, workspace.index_dir, owners=owners_of(train_ids))


def record_fake_version(workspace: Workspace, model: str = "m", version: int = 1,
                        members: list[str] | None = None) -> VersionRecord:
    """A registry row whose files are placeholders (for tests that never load or serve the model)."""
    folder = workspace.version_dir(model, version)
    folder.mkdir(parents=True, exist_ok=True)
    archive = workspace.archive_path(model, version)
    archive.parent.mkdir(parents=True, exist_ok=True)
    archive.write_bytes(b"mar")
    (folder / "checkpoint.pt").write_bytes(b"ckpt")
    return VersionRegistry(workspace.state_db).record_version(
        model, version, archive, folder / "checkpoint.pt", None, parent=None, forget_request=None, metrics={},
        members=members)


def make_v1(workspace: Workspace, model: str = "m", epochs: int = 8,
            trained_on: list[str] | None = None) -> VersionRecord:
    """Train small_cnn on the whole index (or on ``trained_on``), package it as v1 (ONNX backend) and record it
    with its training membership."""
    from tmu_core.index import TrainingIndex
    from tmu_core.serving import package_version
    from tmu_core.train import TrainConfig, save_checkpoint, train_model

    with TrainingIndex.open(workspace.index_dir) as index:
        cfg = TrainConfig(epochs=epochs, batch_size=16, lr=0.05, augment=False, seed=0, amp=False)
        train_ids = index.ids("train") if trained_on is None else sorted(trained_on)
        result = train_model(index, train_ids, "small_cnn", cfg, "cpu")
    staged = workspace.home / "staged" / model / "checkpoint.pt"
    save_checkpoint(staged, result.model, result.meta)
    package = package_version(staged, workspace, model, 1, backend="onnx", batch_size=4, max_batch_delay=5)
    return VersionRegistry(workspace.state_db).record_version(
        model, 1, package.archive, package.checkpoint, package.onnx, parent=None, forget_request=None,
        metrics={"train_accuracy": result.history.train_acc[-1]}, members=train_ids)


def torchserve_config(model_store: Path):
    """A TorchServe config on free loopback ports, the gRPC ports included."""
    from tmu_core.serving import TorchServeConfig

    return TorchServeConfig.with_free_ports(model_store)
