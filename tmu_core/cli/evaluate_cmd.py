"""``tmu-admin evaluate``: run an evaluation protocol and print the paper-style table."""

from __future__ import annotations

from pathlib import Path

import click

from tmu_core.cli import cli
from tmu_core.cli.common import parse_list, tmu_errors

PROTOCOLS = ("cpu-small", "cpu-photo", "digits-tiny", "paper")


def _numbers(text: str | None, option: str, kind: type) -> list | None:
    """Parse ``"1,2"`` into numbers of ``kind``; ``None`` when the option was not given."""
    if text is None:
        return None
    values = []
    for part in parse_list(text):
        try:
            values.append(kind(part))
        except ValueError as err:
            raise click.BadParameter(
                f"{part!r} is not {'an integer' if kind is int else 'a number'}; expected a comma-separated list "
                f"such as {'3,8' if kind is int else '0,1,3'}", param_hint=option) from err
    if not values:
        raise click.BadParameter("expected at least one value", param_hint=option)
    return values


@cli.command("evaluate")
@click.option("--protocol", "protocol_name", type=click.Choice(PROTOCOLS), default="cpu-small", show_default=True,
              help="Built-in protocol to run.")
@click.option("--data", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="CIFAR-10 JPEG zip (default: ../shared/data/cifar10-jpeg.zip beside the repository).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder for results.json/.csv/.png/.txt (default: runs/<protocol>).")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder of cached indexes and trained models, shared between runs (default: <out>/cache).")
@click.option("--methods", default=None, help="Comma-separated methods, e.g. tmu,finetune (default: the protocol's).")
@click.option("--classes", default=None, help="Comma-separated forget classes, e.g. 3,8 (class shape).")
@click.option("--forget-size", type=click.IntRange(min=1), default=None, help="Forget samples per class (class shape).")
@click.option("--forget-shape", default=None,
              help="How forget sets are drawn: class (samples of one class, the default), random (a fraction of "
                   "the training set over all classes) or owner (owners of 1..20 samples each).")
@click.option("--forget-fraction", type=float, default=None,
              help="Share of the training set each random experiment forgets (default 0.01).")
@click.option("--owners", type=click.IntRange(min=1), default=None,
              help="Owners per owner experiment, a merged batch when above 1 (default 1).")
@click.option("--experiments", type=click.IntRange(min=1), default=None,
              help="Forget sets per seed for the random and owner shapes (default: one per protocol forget class).")
@click.option("--seeds", default=None, help="Comma-separated seeds, e.g. 0,1.")
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="Override the training epochs of the original and gold models.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--noise", default=None, help="TMU noise levels, one TMU row each, e.g. 0,1,3,5,10 (Table 4).")
@click.option("--features", "feature_sets", multiple=True,
              help="TMU feature subset, e.g. df,af,cf; repeat for one TMU row per subset (Table 3).")
@click.option("--variant", "variants", multiple=True,
              help="Extra row: a method with options, method:key=value,... (e.g. tmu:cf_per_request=true or "
                   "fisher:alpha=0.03); repeatable.")
@click.option("--sequential", "requests", type=click.IntRange(min=1), default=None,
              help="K forget requests in a row (random or owner shape), each on the previous request's model, "
                   "scored after each against the gold retrained without all forgotten so far.")
@click.option("--floor-every", type=click.IntRange(min=1), default=None,
              help="With --sequential: train the floor gold every N steps and at the last (default: last only).")
@click.option("--progress/--no-progress", default=True, help="Show a progress bar on stderr.")
@click.option("--mia", type=click.Choice(("population", "lira")), default=None,
              help="Membership test: population (the loss-threshold attack, the default) or lira (also the "
                   "per-example LiRA test against shadow models: AUC and TPR at 1%/5% FPR on every row).")
@click.option("--lira-shadows", type=int, default=None,
              help="Shadow models per seed for --mia lira, an even number >= 4 (default 8); one training each, cached.")
@click.option("--wide-test/--no-wide-test", default=None,
              help="Also score every row on all of the zip's test images but TMU's twin part (ACC_wide: about 9,500 "
                   "for CIFAR-10), indexed once in the cache; the eval split alone is a few hundred images.")
@click.option("--split-seed", type=click.IntRange(min=0), default=None,
              help="Seed of the twin/eval split of the test images (default: the protocol's, 0). The twin part is "
                   "the held-out sample TMU measures each class's easy share on; vary it to see that sample's noise.")
def evaluate(protocol_name: str, data: Path | None, out_dir: Path | None, cache_dir: Path | None,
             methods: str | None, classes: str | None, forget_size: int | None, forget_shape: str | None,
             forget_fraction: float | None, owners: int | None, experiments: int | None, seeds: str | None,
             epochs: int | None, device: str, noise: str | None, feature_sets: tuple[str, ...],
             variants: tuple[str, ...], requests: int | None, floor_every: int | None, progress: bool,
             mia: str | None, lira_shadows: int | None, wide_test: bool | None, split_seed: int | None) -> None:
    """Train the original, gold and floor models, run the unlearning methods and print the metrics table."""
    from tmu_core.device import resolve_device
    from tmu_core.evaluate import builtin_protocol, customize, format_table, run_protocol, run_sequential
    from tmu_core.evaluate.sequential import format_drift

    if requests is not None and experiments is not None:
        raise click.BadParameter("--sequential K sets the number of forget sets; leave out --experiments",
                                 param_hint="--experiments")
    if floor_every is not None and requests is None:
        raise click.BadParameter("applies to --sequential runs only", param_hint="--floor-every")

    noise_levels = _numbers(noise, "--noise", float) or []
    with tmu_errors():
        protocol = customize(
            builtin_protocol(protocol_name, data),
            methods=parse_list(methods) if methods is not None else None,
            classes=_numbers(classes, "--classes", int),
            forget_size=forget_size,
            seeds=_numbers(seeds, "--seeds", int),
            noise_levels=noise_levels,
            feature_sets=[parse_list(subset) for subset in feature_sets],
            variants=variants,
            epochs=epochs,
            forget_shape=forget_shape,
            forget_fraction=forget_fraction,
            owners=owners,
            experiments=experiments,
            mia=mia,
            lira_shadows=lira_shadows,
            wide_test=wide_test,
            split_seed=split_seed,
        )
        out = out_dir if out_dir is not None else Path("runs") / protocol_name
        if requests is None:
            result = run_protocol(protocol, out, resolve_device(device), cache_dir=cache_dir, progress=progress)
        else:
            result = run_sequential(protocol, requests, out, resolve_device(device), cache_dir=cache_dir,
                                    floor_every=floor_every, progress=progress)
            click.echo(format_drift(result))
            click.echo("")
    click.echo(format_table(result))
    click.echo("")
    for kind, path in result.files.items():
        click.echo(f"{kind}: {path}")
