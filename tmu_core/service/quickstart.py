"""The quickstart: index a small data set, train, serve, predict, forget a data owner, and see the new version serve.

Runs on scikit-learn's bundled digits by default (offline), or on a CIFAR-10-style ImageFolder zip. Everything
lives in one folder (``<dir>/.tmu`` and ``<dir>/model_store``); TorchServe and the extension service are stopped at
the end, also when a step fails. Progress goes to the ``say`` callback, one line per event.
"""

from __future__ import annotations

import io
import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tmu_core.config import Workspace
from tmu_core.errors import ConflictError, InvalidInputError

logger = logging.getLogger(__name__)

MODEL = "quickstart"


@dataclass(frozen=True)
class QuickstartConfig:
    """Settings of a quickstart run.

    Attributes:
        folder: where the workspace and model store are made.
        data: ``None`` for scikit-learn digits, or a path to an ImageFolder zip (e.g. CIFAR-10 JPEGs).
        train_per_class / test_per_class: subset sizes for a zip (ignored for digits).
        owner_size: training samples per data owner.
        forget_samples: 0 forgets one data owner; N > 0 forgets N training samples of several owners.
        epochs: training epochs of the small CNN.
        device: where training and the forget job run.
        overwrite: replace ``folder`` even when it holds more than an earlier quickstart's output.
        seed: seeds the owner grouping, the training and the job.
    """

    folder: Path = Path("quickstart")
    data: Path | None = None
    train_per_class: int = 200
    test_per_class: int = 100
    owner_size: int = 5
    forget_samples: int = 0
    epochs: int = 15
    device: str = "auto"
    overwrite: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("train_per_class", "test_per_class", "owner_size", "epochs"):
            if getattr(self, name) < 1:
                raise InvalidInputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.forget_samples < 0:
            raise InvalidInputError(f"forget_samples must be >= 0, got {self.forget_samples}")
        if self.data is not None and not Path(self.data).is_file():
            raise InvalidInputError(f"data zip {self.data} does not exist; give a CIFAR-10-style ImageFolder zip "
                                    "or leave it out for the bundled digits")


@dataclass(frozen=True)
class QuickstartResult:
    """What the quickstart showed."""

    workspace: Path
    job_id: str
    forgotten: int
    version_before: str
    version_after: str
    report: dict[str, Any] = field(default_factory=dict)
    report_png: Path | None = None
    seconds: float = 0.0


def owner_groups(train_ids: list[str], size: int, seed: int) -> dict[str, str]:
    """Shuffle the training ids (seeded) and give each run of ``size`` ids one owner ``owner-00000``..."""
    from tmu_core.device import generator
    import torch

    order = torch.randperm(len(train_ids), generator=generator(seed)).tolist()
    return {train_ids[i]: f"owner-{rank // size:05d}" for rank, i in enumerate(order)}


def build_index(workspace: Workspace, config: QuickstartConfig) -> Any:
    """Ingest the data twice: once to learn the training ids, once with the owner mapping. Returns the index."""
    from tmu_core.index import ingest_digits, ingest_zip

    def ingest(owners: dict[str, str] | None) -> Any:
        if config.data is None:
            return ingest_digits(workspace.index_dir, seed=config.seed, owners=owners, overwrite=True)
        return ingest_zip(config.data, workspace.index_dir, owners=owners, train_per_class=config.train_per_class,
                          test_per_class=config.test_per_class, overwrite=True)

    with ingest(None) as plain:
        train_ids = plain.ids("train")
    return ingest(owner_groups(train_ids, config.owner_size, config.seed))


def train_v1(workspace: Workspace, index: Any, config: QuickstartConfig, device: Any) -> Any:
    """Train the small CNN on every training sample, package it as v1 and record it as serving."""
    from tmu_core.state.versions import VersionRegistry
    from tmu_core.serving import package_version
    from tmu_core.train import TrainConfig, save_checkpoint, train_model

    cfg = TrainConfig(epochs=config.epochs, batch_size=64, lr=0.05, augment=False, seed=config.seed)
    train_ids = index.ids("train")
    result = train_model(index, train_ids, "small_cnn", cfg, device)
    staged = workspace.home / "staged" / "checkpoint.pt"
    save_checkpoint(staged, result.model, result.meta)
    package = package_version(staged, workspace, MODEL, 1, backend="onnx", batch_size=8, max_batch_delay=10)
    shutil.rmtree(staged.parent, ignore_errors=True)
    return VersionRegistry(workspace.state_db).record_version(
        MODEL, 1, package.archive, package.checkpoint, package.onnx, parent=None, forget_request=None,
        metrics={"train_accuracy": result.history.train_acc[-1]}, members=train_ids)


def sample_png(index: Any, sample_id: str) -> bytes:
    """One indexed image as PNG bytes (what a client would send for a prediction)."""
    from PIL import Image

    chw = index.load([sample_id])[0].numpy()  # (C, H, W) uint8
    pixels = chw[0] if chw.shape[0] == 1 else chw.transpose(1, 2, 0)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _forget_request(index: Any, config: QuickstartConfig) -> dict[str, list[str]]:
    if config.forget_samples == 0:
        owner = index.lookup([index.ids("train")[0]])[0].owner_id
        return {"owner_ids": [owner]}
    import torch

    from tmu_core.device import generator

    ids = index.ids("train")
    if config.forget_samples >= len(ids):
        raise InvalidInputError(f"forget_samples {config.forget_samples} must be below the {len(ids)} training "
                                "samples")
    order = torch.randperm(len(ids), generator=generator(config.seed + 1)).tolist()
    return {"sample_ids": sorted(ids[i] for i in order[:config.forget_samples])}


def prepare_folder(config: QuickstartConfig) -> Workspace:
    """Empty ``config.folder`` (see ``overwrite``) and return the workspace inside it.

    Raises:
        ConflictError: the folder holds files other than an earlier quickstart's and ``overwrite`` is off.
    """
    folder = Path(config.folder).absolute()
    if folder.exists() and any(folder.iterdir()):
        # A folder holding only an earlier quickstart's output is replaced; anything else needs ``overwrite``.
        earlier_run = {p.name for p in folder.iterdir()} <= {".tmu", "model_store"}
        if not (config.overwrite or earlier_run):
            raise ConflictError(f"{folder} exists and holds other files; pass overwrite (--overwrite) or another "
                                "folder")
        shutil.rmtree(folder)
    return Workspace(home=folder / ".tmu", model_store=folder / "model_store")


def run_quickstart(config: QuickstartConfig, say: Callable[[str], None] = logger.info,
                   on_job: Callable[[dict[str, Any]], None] | None = None) -> QuickstartResult:
    """Run the whole demo (see the module docstring).

    Args:
        config: data, sizes and folder.
        say: receives one human-readable line per event.
        on_job: receives the forget job at every poll (for a progress bar).

    Raises:
        ConflictError: the folder is not empty and ``overwrite`` is off.
        TmuError: any step failed (TorchServe and the extension are stopped first).
    """
    from tmu_core.device import resolve_device, seed_everything
    from tmu_core.serving import TorchServe, TorchServeConfig

    started = time.perf_counter()
    seed_everything(config.seed)
    device = resolve_device(config.device)
    workspace = prepare_folder(config)
    index = build_index(workspace, config)
    info = index.info()
    say(f"index: {info.counts['train']} training / {info.counts['test']} test images, {info.owners} owners "
        f"({workspace.index_dir})")
    v1 = train_v1(workspace, index, config, device)
    say(f"trained small_cnn ({v1.metrics['train_accuracy']:.1f}% train accuracy), packaged {v1.archive.name}")
    server = TorchServe(workspace, TorchServeConfig.with_free_ports(workspace.model_store))
    try:
        server.start([f"{MODEL}={v1.archive.name}"])
        server.wait_ready(MODEL, timeout=120)
        say(f"TorchServe serves {MODEL} v1 at {server.config.url('inference')}")
        return _serve_and_forget(workspace, server, index, config, say, on_job, started)
    finally:
        index.close()
        server.stop()
        say("TorchServe stopped")


def _serve_and_forget(workspace: Workspace, server: Any, index: Any, config: QuickstartConfig,
                      say: Callable[[str], None], on_job: Callable[[dict[str, Any]], None] | None,
                      started: float) -> QuickstartResult:
    from tmu_core.service.client import ExtensionClient
    from tmu_core.forget.dispatcher import WorkerSettings
    from tmu_core.forget.report import REPORT_PNG
    from tmu_core.service.server import ServiceConfig, in_process

    infer = server.inference()
    probe = index.ids("test")[0]
    image = sample_png(index, probe)
    before = infer.predict(MODEL, image)
    say(f"predict {probe}: {before.predictions[0].name} (model_version {before.model_version})")
    request = _forget_request(index, config)
    from tmu_core.forget.artifacts import prepare_version

    seconds = prepare_version(workspace, MODEL, device=config.device)
    say(f"prepared v1's TMU artifacts in {seconds:.1f}s (once per version, before any request)")
    with in_process(workspace, ServiceConfig(worker=WorkerSettings(device=config.device))) as service:
        say(f"extension service at {service.url} (key in {workspace.serve_dir / 'extension.key'})")
        client = ExtensionClient(service.url, service.key)
        accepted = client.forget(MODEL, **request)
        asked = (f"data owner {request['owner_ids'][0]}" if "owner_ids" in request
                 else f"{len(request['sample_ids'])} training samples")
        say(f"forget request for {asked}: job {accepted['job_id']} ({accepted['samples']} samples)")
        job = client.wait(accepted["job_id"], timeout=600, on_update=on_job)
    if job["state"] != "succeeded":
        raise ConflictError(f"forget job {job['id']} failed: {job['reason']}")
    after = infer.predict(MODEL, image)
    say(f"predict {probe}: {after.predictions[0].name} (model_version {after.model_version})")
    png = workspace.version_dir(MODEL, job["to_version"]) / REPORT_PNG
    return QuickstartResult(workspace=workspace.home, job_id=job["id"], forgotten=job["result"]["samples"],
                            version_before=before.model_version, version_after=after.model_version,
                            report=job["result"], report_png=png, seconds=round(time.perf_counter() - started, 1))
