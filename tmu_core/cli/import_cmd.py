"""``tmu-admin import``: put an existing torchvision classifier under tmu-serve as a served, forgettable version."""

from __future__ import annotations

from pathlib import Path

import click

from tmu_core.cli import cli
from tmu_core.cli.common import echo_json, tmu_errors
from tmu_core.config import Workspace

_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@cli.command("import")
@click.option("--model", "model_name", required=True, help="TorchServe model name (letters, digits, _ and -).")
@click.option("--arch", default=None, help="torchvision architecture, e.g. resnet50 (found from --mar if omitted).")
@click.option("--weights", type=_FILE, default=None, help="state_dict file of the torchvision network.")
@click.option("--classes", type=_FILE, default=None,
              help="Class names: one a line, a JSON list, or an index_to_name.json.")
@click.option("--mar", type=_FILE, default=None, help="An archive made for TorchServe's stock image_classifier.")
@click.option("--image-size", type=click.IntRange(min=8), default=None,
              help="Model input side in pixels (default: the weights' crop size, 224 for most).")
@click.option("--resize", type=click.IntRange(min=8), default=None,
              help="Shorter side before the centre crop (default: the weights', or --image-size when given).")
@click.option("--trained-on", type=_FILE, default=None,
              help="File of the index's sample ids the model was trained on, one a line (default: the index's "
                   "whole training split).")
@click.option("--version", type=click.IntRange(min=1), default=None,
              help="Version number (default: the registry's next version).")
@click.option("--backend", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True,
              help="What the handler runs.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="TorchServe batch size.")
@click.pass_obj
def import_command(workspace: Workspace, model_name: str, arch: str | None, weights: Path | None,
                   classes: Path | None, mar: Path | None, image_size: int | None, resize: int | None,
                   trained_on: Path | None, version: int | None, backend: str, batch_size: int) -> None:
    """Import a torchvision classifier (--arch --weights --classes, or --mar) as the model's next version."""
    from tmu_core.service.import_model import ImportSpec, import_model
    from tmu_core.service.publish import read_manifest

    if (weights is None) == (mar is None):
        raise click.UsageError("give --weights (with --arch and --classes) or --mar, not both or neither")
    if weights is not None and (arch is None or classes is None):
        raise click.UsageError("--weights needs --arch and --classes")
    if mar is not None and classes is not None:
        raise click.UsageError("--classes and --mar conflict: the archive's index_to_name.json names the classes")
    with tmu_errors():
        spec = ImportSpec(model=model_name, arch=arch, weights=weights, classes=classes, mar=mar,
                          image_size=image_size, resize=resize,
                          trained_on=tuple(read_manifest(trained_on)) if trained_on else None, version=version,
                          backend=backend, batch_size=batch_size)
        result = import_model(workspace, spec)
    package = result.package
    echo_json({"model": package.model, "version": package.version, "arch": result.arch, "head": result.head,
               "preprocess": result.preprocess, "trained_on": result.trained_on, "archive": str(package.archive),
               "checkpoint": str(package.checkpoint), "onnx": str(package.onnx), "sha256": package.sha256s,
               "onnx_max_abs_diff": package.onnx_check.max_abs_diff})
