"""``tmu-admin index ...``: build, describe and check the training index."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click

from tmu_core.cli import cli
from tmu_core.cli.common import echo_json, tmu_errors
from tmu_core.config import Workspace
from tmu_core.index import IndexInfo, TrainingIndex, add_images, ingest_digits, ingest_image_folder, ingest_zip


def _index_option(func: Callable) -> Callable:
    return click.option(
        "--index", "index_path", type=click.Path(file_okay=False, path_type=Path), default=None,
        help="Index folder (default: <home>/index).",
    )(func)


def _resolve(ctx: click.Context, index_path: Path | None) -> Path:
    workspace: Workspace = ctx.obj
    return index_path if index_path is not None else workspace.index_dir


@cli.group("index")
def index_group() -> None:
    """Build, describe and check the training index."""


def _check_sources(zip_path: Path | None, folder: Path | None, digits: bool, train_per_class: int | None,
                   test_per_class: int | None) -> None:
    chosen = [flag for flag, on in (("--zip", zip_path), ("--folder", folder), ("--digits", digits)) if on]
    if len(chosen) != 1:
        got = " and ".join(chosen) if chosen else "none"
        raise click.UsageError(f"give exactly one of --zip, --folder or --digits (got {got})")
    if digits and (train_per_class is not None or test_per_class is not None):
        raise click.UsageError("--train-per-class and --test-per-class apply to --zip and --folder, not --digits")


@index_group.command("build")
@click.option("--zip", "zip_path", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Zip of an ImageFolder tree (train/<class>/*, test/<class>/*).")
@click.option("--folder", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="ImageFolder tree with train/ and test/.")
@click.option("--digits", is_flag=True, help="scikit-learn's bundled 8x8 digits (offline quickstart).")
@click.option("--owners", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV (header sample_id,owner_id) or JSON object mapping sample ids to owner ids.")
@click.option("--train-per-class", type=click.IntRange(min=1), default=None, help="First N train files per class.")
@click.option("--test-per-class", type=click.IntRange(min=1), default=None, help="First N test files per class.")
@click.option("--test-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Held-out share of each class (--digits only).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the split (--digits only).")
@click.option("--overwrite", is_flag=True,
              help="Replace an existing index, keeping its tombstones and skipping the images it forgot.")
@_index_option
@click.pass_context
def build(ctx: click.Context, zip_path: Path | None, folder: Path | None, digits: bool, owners: Path | None,
          train_per_class: int | None, test_per_class: int | None, test_fraction: float, seed: int,
          overwrite: bool, index_path: Path | None) -> None:
    """Build the training index from a zip, a folder or the bundled digits."""
    _check_sources(zip_path, folder, digits, train_per_class, test_per_class)
    dest = _resolve(ctx, index_path)
    with tmu_errors():
        if digits:
            index = ingest_digits(dest, test_fraction=test_fraction, seed=seed, owners=owners, overwrite=overwrite)
        else:
            ingest = ingest_zip if zip_path is not None else ingest_image_folder
            index = ingest(zip_path or folder, dest, owners=owners, train_per_class=train_per_class,
                           test_per_class=test_per_class, overwrite=overwrite)
        with index:
            info, record = index.info(), index.build_record()
    click.echo(f"indexed {info.counts['train']} train and {info.counts['test']} test images "
               f"({len(info.classes)} classes, shape {_shape(info)}) into {info.path}")
    if record is not None and (record.tombstones_kept or record.skipped_forgotten):
        click.echo(f"skipped {record.skipped_forgotten} forgotten image(s); kept {record.tombstones_kept} "
                   "tombstone(s) of the replaced index")


@index_group.command("add")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--owners", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="CSV (header sample_id,owner_id) or JSON object mapping the new sample ids to owner ids.")
@_index_option
@click.pass_context
def add(ctx: click.Context, source: Path, owners: Path | None, index_path: Path | None) -> None:
    """Append newly collected samples from SOURCE (an ImageFolder tree train/<class>/*, test/<class>/*, or a
    zip of one) to the index, for the next model version trained or imported on it."""
    with tmu_errors(), TrainingIndex.open(_resolve(ctx, index_path)) as index:
        result = add_images(index, source, owners=owners)
        info = index.info()
    click.echo(f"added {result.stored} image(s) from {source} to {info.path}; now {info.counts['train']} train "
               f"and {info.counts['test']} test images, shape {_shape(info)}")
    if result.skipped_forgotten:
        click.echo(f"skipped {result.skipped_forgotten} image(s) the index forgot")


def _shape(info: IndexInfo) -> str:
    if info.image_shape is None:
        return "mixed (images differ in size or channels)"
    return "x".join(str(d) for d in info.image_shape)


def _echo_info(info: IndexInfo) -> None:
    click.echo(f"index:      {info.path}")
    click.echo(f"classes:    {len(info.classes)}")
    click.echo(f"shape:      {_shape(info)} (C x H x W)")
    click.echo(f"samples:    train {info.counts['train']}, test {info.counts['test']}")
    click.echo(f"owners:     {info.owners}")
    click.echo(f"tombstones: {info.tombstones}")
    click.echo(f"size:       {info.size_bytes} bytes")
    width = max(len("class"), *(len(name) for name in info.classes))
    click.echo(f"{'class'.ljust(width)}  train   test")
    for name in info.classes:
        train, test = info.class_counts["train"][name], info.class_counts["test"][name]
        click.echo(f"{name.ljust(width)}  {train:5d}  {test:5d}")


@index_group.command("info")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@_index_option
@click.pass_context
def info(ctx: click.Context, as_json: bool, index_path: Path | None) -> None:
    """Describe the training index: classes, counts, owners, tombstones, size."""
    with tmu_errors(), TrainingIndex.open(_resolve(ctx, index_path)) as index:
        summary = index.info()
    if as_json:
        echo_json(summary)
    else:
        _echo_info(summary)


@index_group.command("verify")
@_index_option
@click.pass_context
def verify(ctx: click.Context, index_path: Path | None) -> None:
    """Check every sample against its hash and every forgotten byte range for zeros (exit 1 when not ok)."""
    with tmu_errors(), TrainingIndex.open(_resolve(ctx, index_path)) as index:
        report = index.verify()
    for sample_id in report.bad:
        click.echo(f"bad: {sample_id}")
    for sample_id in report.unwiped:
        click.echo(f"unwiped: {sample_id}")
    if not report.ok:
        raise click.ClickException(
            f"index check failed: {len(report.bad)} bad sample(s), {len(report.unwiped)} unwiped tombstone(s) "
            f"of {report.checked} checked"
        )
    click.echo(f"ok: {report.checked} checked")
