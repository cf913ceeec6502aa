"""``tmu-admin train``: train a model on the training index and write its checkpoint."""

from __future__ import annotations

import re
from pathlib import Path

import click

from tmu_core.cli import cli
from tmu_core.cli.common import echo_json, tmu_errors
from tmu_core.config import Workspace, env_device
from tmu_core.device import resolve_device
from tmu_core.models import list_models
from tmu_core.train import TrainConfig
from tmu_core.train.run import train_to_checkpoint

_MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def _recipe(epochs: int | None, paper_schedule: bool, no_augment: bool, seed: int, deterministic: bool,
            lr: float, batch_size: int) -> TrainConfig:
    if paper_schedule and epochs is not None:
        raise click.UsageError("--paper-schedule (200 epochs) and --epochs N conflict; give one of them")
    overrides = {"augment": not no_augment, "seed": seed, "deterministic": deterministic, "lr": lr,
                 "batch_size": batch_size}
    return TrainConfig.paper(**overrides) if paper_schedule else TrainConfig.short(epochs or 30, **overrides)


@cli.command("train")
@click.option("--model", "model_name", required=True, help="Model name (letters, digits, '_' and '-').")
@click.option("--arch", default="small_cnn", show_default=True,
              help="Architecture: small_cnn, resnet18, allcnn or vit_small.")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Epochs (default 30; lr /10 at 50% and 75%).")
@click.option("--paper-schedule", is_flag=True, help="The paper's 200 epochs (lr /10 after 100 and 150).")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=0.01, show_default=True,
              help="Initial learning rate.")
@click.option("--batch-size", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--no-augment", is_flag=True, help="No random crop / flip (lets a small model fit its training set).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--deterministic", is_flag=True, help="Deterministic kernels (same seed -> same weights).")
@click.option("--device", default=None, help="auto, cpu, cuda or cuda:N (default: $TMU_DEVICE or auto).")
@click.option("--retain-only", is_flag=True,
              help="Train on the retained set D_r (the gold model). Forgotten samples are already gone from "
                   "the train split, so today this is the same set; it is recorded as 'retained'.")
@click.option("--index", "index_path", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Index folder (default: <home>/index).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Checkpoint file (default: <home>/models/<model>/v1/checkpoint.pt).")
@click.option("--image-size", type=click.IntRange(min=1), default=None,
              help="Model input side: each image resized (shorter side) and centre-cropped to it; needed for an "
                   "index of photos of mixed sizes (default: the index's one size).")
@click.option("--resize", type=click.IntRange(min=1), default=None,
              help="Shorter side before the centre crop (default: --image-size).")
@click.option("--force", is_flag=True, help="Overwrite an existing checkpoint file.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@click.pass_context
def train(ctx: click.Context, model_name: str, arch: str, epochs: int | None, paper_schedule: bool,
          lr: float, batch_size: int, no_augment: bool, seed: int, deterministic: bool, device: str | None,
          retain_only: bool, index_path: Path | None, image_size: int | None, resize: int | None, force: bool,
          out: Path | None, progress: bool) -> None:
    """Train ARCH on the index's train split and write the checkpoint; prints train/test accuracy as JSON."""
    workspace: Workspace = ctx.obj
    if not _MODEL_NAME.match(model_name):
        raise click.BadParameter(f"{model_name!r}: use letters, digits, '_' and '-'", param_hint="--model")
    if arch not in list_models():
        raise click.BadParameter(f"unknown architecture {arch!r}; valid: {', '.join(list_models())}",
                                 param_hint="--arch")
    out = out if out is not None else workspace.version_dir(model_name, 1) / "checkpoint.pt"
    if out.exists() and not force:
        raise click.ClickException(f"checkpoint {out} already exists; pass --force to overwrite or choose --out")
    if resize is not None and image_size is None:
        raise click.UsageError("--resize needs --image-size")
    with tmu_errors():
        cfg = _recipe(epochs, paper_schedule, no_augment, seed, deterministic, lr, batch_size)
        report = train_to_checkpoint(
            index_path if index_path is not None else workspace.index_dir, arch, cfg,
            resolve_device(device or env_device()), out, retain_only=retain_only, progress=progress,
            image_size=image_size, resize=resize,
        )
    echo_json(report)
