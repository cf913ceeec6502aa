"""Time ingesting a CIFAR-10 zip into a training index and compare its size on disk with the zip's.

Usage:
    OMP_NUM_THREADS=1 .venv/bin/python scripts/bench_index.py [--zip PATH] [--train-per-class N]
        [--test-per-class N] [--verify]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from tmu_core.index import ingest_zip

DEFAULT_ZIP = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cifar10-jpeg.zip"


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP, help="ImageFolder zip (default: %(default)s)")
    parser.add_argument("--train-per-class", type=int, default=None)
    parser.add_argument("--test-per-class", type=int, default=None)
    parser.add_argument("--verify", action="store_true", help="also time verify() over the whole index")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        start = time.perf_counter()
        index = ingest_zip(args.zip, Path(tmp) / "index", train_per_class=args.train_per_class,
                           test_per_class=args.test_per_class)
        seconds = time.perf_counter() - start
        with index:
            info = index.info()
            verify_s = None
            if args.verify:
                start = time.perf_counter()
                report = index.verify()
                verify_s = time.perf_counter() - start
                if not report.ok:
                    raise SystemExit(f"verify failed: {len(report.bad)} bad, {len(report.unwiped)} unwiped")
    images = info.counts["train"] + info.counts["test"]
    zip_bytes = args.zip.stat().st_size
    rows = [("images", f"{images}"), ("seconds", f"{seconds:.1f}"), ("images/s", f"{images / seconds:.0f}"),
            ("index bytes", f"{info.size_bytes}"), ("zip bytes", f"{zip_bytes}"),
            ("ratio", f"{info.size_bytes / zip_bytes:.3f}")]
    if verify_s is not None:
        rows.append(("verify seconds", f"{verify_s:.1f}"))
    width = max(len(name) for name, _ in rows)
    print(f"{'metric'.ljust(width)}  value")
    for name, value in rows:
        print(f"{name.ljust(width)}  {value}")


if __name__ == "__main__":
    main()
