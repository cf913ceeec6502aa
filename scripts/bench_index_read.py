"""How long reading training images from the index takes, as stored and through a model's Preprocess.

Builds an index of the first ``--per-class`` CIFAR-10 training images of each class (in a temporary folder),
then times ``TrainingIndex.load`` of all of them, stored and through ``Preprocess`` at each ``--sizes`` (``S`` or
``S/R`` for size S after a shorter-side resize to R), best of ``--repeats``. Prints a table.

Usage: .venv/bin/python scripts/bench_index_read.py [--zip ../shared/data/cifar10-jpeg.zip] [--per-class 100]
       [--sizes 32,48,224/256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tmu_core.evaluate.protocols import DEFAULT_CIFAR_ZIP
from tmu_core.index import ingest_zip
from tmu_core.preprocess import Preprocess


def _preprocess(text: str) -> Preprocess:
    size, _, resize = text.partition("/")
    return Preprocess(size=int(size), resize=int(resize) if resize else None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--zip", type=Path, default=DEFAULT_CIFAR_ZIP)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--sizes", default="32,48,224/256")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    reads = [("stored pixels", None)] + [(f"Preprocess({t})", _preprocess(t)) for t in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="tmu-index-read-") as tmp:
        with ingest_zip(args.zip, Path(tmp) / "index", train_per_class=args.per_class, test_per_class=2) as index:
            ids = index.ids("train")
            print(f"{'read':24s} {'images':>6s} {'best s':>7s} {'images/s':>9s}  shape")
            for name, preprocess in reads:
                times = []
                for _ in range(args.repeats):
                    started = time.perf_counter()
                    images = index.load(ids, preprocess=preprocess)
                    times.append(time.perf_counter() - started)
                best = min(times)
                print(f"{name:24s} {len(ids):6d} {best:7.2f} {len(ids) / best:9.0f}  {tuple(images.shape)}")


if __name__ == "__main__":
    main()
