"""``tmu-admin quickstart``: the whole tour in one command (index, train, serve, predict, forget, predict)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from tmu_core.cli import cli
from tmu_core.cli.common import tmu_errors


@cli.command("quickstart")
@click.option("--dir", "folder", type=click.Path(file_okay=False, path_type=Path), default=Path("quickstart"),
              show_default=True, help="Folder for the demo's workspace and model store.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="ImageFolder zip (e.g. CIFAR-10 JPEGs); default: scikit-learn's bundled digits.")
@click.option("--train-per-class", type=click.IntRange(min=1), default=200, show_default=True,
              help="Training images per class taken from --data.")
@click.option("--test-per-class", type=click.IntRange(min=1), default=100, show_default=True,
              help="Test images per class taken from --data.")
@click.option("--forget-samples", type=click.IntRange(min=0), default=0, show_default=True,
              help="0: forget one data owner's samples; N: forget N random training samples.")
@click.option("--epochs", type=click.IntRange(min=1), default=15, show_default=True, help="Training epochs.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace --dir even if it holds more than an earlier quickstart's files.")
def quickstart(folder: Path, data: Path | None, train_per_class: int, test_per_class: int, forget_samples: int,
               epochs: int, device: str, overwrite: bool) -> None:
    """Index data, train a small CNN, serve it, forget a data owner, and watch the new version serve."""
    from tqdm import tqdm

    from tmu_core.service.quickstart import QuickstartConfig, run_quickstart
    from tmu_core.forget.report import format_report

    with tmu_errors():
        config = QuickstartConfig(folder=folder, data=data, train_per_class=train_per_class,
                                  test_per_class=test_per_class, forget_samples=forget_samples, epochs=epochs,
                                  device=device, overwrite=overwrite)
        with tqdm(total=100, desc="forget job", unit="%", file=click.get_text_stream("stderr"),
                  bar_format="{desc} {bar} {n:.0f}% {postfix}", disable=None) as bar:
            def on_job(job: dict[str, Any]) -> None:
                bar.n = round(100 * float(job.get("progress") or 0.0))
                bar.set_postfix_str(f"{job['state']} {job.get('step') or ''}")
                bar.refresh()

            result = run_quickstart(config, say=lambda line: tqdm.write(line, file=click.get_text_stream("stdout")),
                                    on_job=on_job)
    click.echo(format_report(result.report))
    click.echo(f"report figure: {result.report_png}")
    click.echo(f"model_version before {result.version_before}, after {result.version_after}; "
               f"{result.forgotten} samples forgotten; {result.seconds:.0f}s in all (workspace {result.workspace})")
