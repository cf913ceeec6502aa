"""Benchmark: train a model on a CIFAR-10 subset and print speed and accuracy.

Builds (or reuses) a training index of the first ``--train-per-class`` / ``--test-per-class`` images of each
class from the CIFAR-10 JPEG zip, trains with and/or without crop-flip augmentation, and prints one row per run:
arch, params, epochs, augment, seconds, img/s, clean train accuracy, test accuracy.

Example (about 5 minutes per run on 2 CPU cores)::

    python scripts/bench_train.py --epochs 30 --augment both
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from tmu_core.device import resolve_device
from tmu_core.index import TrainingIndex, ingest_zip
from tmu_core.models import count_parameters
from tmu_core.train import TrainConfig, accuracy, train_model

DEFAULT_ZIP = Path("/work/shared/data/cifar10-jpeg.zip")


@dataclass(frozen=True)
class BenchRow:
    arch: str
    params: int
    epochs: int
    lr: float
    weight_decay: float
    milestones: tuple[float, ...]
    augment: bool
    seconds: float
    img_per_s: float
    train_acc: float
    test_acc: float
    device: str
    threads: int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP, help="CIFAR-10 ImageFolder zip")
    parser.add_argument("--index", type=Path, default=None,
                        help="index folder to build or reuse (default: a fresh temp folder)")
    parser.add_argument("--train-per-class", type=int, default=500)
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--arch", default="small_cnn")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--milestones", type=float, nargs="+", default=[0.5, 0.75],
                        help="fractions of the epochs where the lr drops 10x")
    parser.add_argument("--augment", choices=["on", "off", "both"], default="both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    parser.add_argument("--progress", action="store_true", help="tqdm bar per run")
    return parser.parse_args(argv)


def open_index(args: argparse.Namespace, scratch: Path) -> TrainingIndex:
    """Reuse ``--index`` when it exists, else ingest the zip subset."""
    if args.index is not None and args.index.exists():
        return TrainingIndex.open(args.index)
    dest = args.index if args.index is not None else scratch / "index"
    logging.info("ingesting %s (%d train / %d test per class) into %s", args.zip, args.train_per_class,
                 args.test_per_class, dest)
    return ingest_zip(args.zip, dest, train_per_class=args.train_per_class, test_per_class=args.test_per_class)


def run_one(index: TrainingIndex, args: argparse.Namespace, augment: bool, device: torch.device) -> BenchRow:
    train_ids, test_ids = index.ids("train"), index.ids("test")
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
                      milestones=tuple(args.milestones), augment=augment, seed=args.seed)
    result = train_model(index, train_ids, args.arch, cfg, device, progress=args.progress)
    seconds = result.history.seconds
    return BenchRow(
        arch=args.arch, params=count_parameters(result.model), epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, milestones=tuple(args.milestones), augment=augment,
        seconds=round(seconds, 1), img_per_s=round(args.epochs * len(train_ids) / seconds, 1),
        train_acc=round(accuracy(result.model, index.load(train_ids), index.labels(train_ids), device), 2),
        test_acc=round(accuracy(result.model, index.load(test_ids), index.labels(test_ids), device), 2),
        device=str(device), threads=torch.get_num_threads(),
    )


def format_table(rows: list[BenchRow]) -> str:
    header = f"{'arch':<10} {'params':>9} {'epochs':>6} {'lr':>6} {'augment':>7} {'seconds':>8} {'img/s':>7} " \
             f"{'train acc':>9} {'test acc':>8}"
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r.arch:<10} {r.params:>9,} {r.epochs:>6} {r.lr:>6g} {str(r.augment):>7} {r.seconds:>8.1f} "
                     f"{r.img_per_s:>7.1f} {r.train_acc:>9.2f} {r.test_acc:>8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    device = resolve_device(args.device)
    settings = {"on": [True], "off": [False], "both": [True, False]}[args.augment]
    rows = []
    with tempfile.TemporaryDirectory() as scratch, open_index(args, Path(scratch)) as index:
        logging.info("train=%d test=%d device=%s threads=%d", len(index.ids("train")), len(index.ids("test")),
                     device, torch.get_num_threads())
        for augment in settings:
            rows.append(run_one(index, args, augment, device))
            logging.info("done: %s", rows[-1])
    print(format_table(rows))
    if args.json is not None:
        args.json.write_text(json.dumps([asdict(r) for r in rows], indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
