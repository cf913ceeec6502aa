"""Benchmark: how retraining, TMU's preparation and a forget request grow with the size of the training set.

For each size N (the first N/10 CIFAR-10 training images of each class, and the first ``--test-per-class``
test images of each class, halved between the twin problem's D_test and evaluation) the script builds a training
index from the CIFAR-10 JPEG zip, trains the original ``small_cnn`` with the quickstart's recipe and measures:

- retrain: the ``retrain`` method, a fresh model trained from scratch on D_r with the original's recipe;
- prepare: TMU's per-version preparation through ``tmu_core.forget.artifacts.prepare``, the call a forget job
  and ``prepare_version`` make (the version's IndexView, ``plan_data``'s twin/eval split, files under the
  version's artifacts folder), with the peak resident memory of the process while it runs;
- forget: one request of ``--forget`` training samples as a job's worker runs it: a fresh ``tmu`` method,
  ``artifacts.prepare`` (which reloads the prepared files) and the method's ``unlearn``.

Each phase of each size runs in its own process, so that one phase's memory does not count in another's peak.
The peak is the kernel's high-water mark of resident memory (``VmHWM``), reset just before the preparation.
Imports a worker process pays once (``torch._dynamo``, on the first Adam step) happen before the clocks start.

Example (about 10 minutes on 2 idle CPU cores)::

    OMP_NUM_THREADS=2 python scripts/bench_scale.py --sizes 2000,5000,10000 --work /tmp/bench-scale
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_ZIP = Path("/work/shared/data/cifar10-jpeg.zip")
PHASES = ("train", "prepare", "retrain")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zip", type=Path, default=DEFAULT_ZIP, help="CIFAR-10 ImageFolder zip")
    parser.add_argument("--work", type=Path, required=True, help="folder for the indexes, models and artifacts")
    parser.add_argument("--sizes", default="2000,5000,10000", help="training-set sizes, comma-separated")
    parser.add_argument("--test-per-class", type=int, default=100)
    parser.add_argument("--epochs", type=int, default=10, help="epochs of the original model's recipe")
    parser.add_argument("--forget", type=int, default=100, help="training samples in the forget request")
    parser.add_argument("--phases", default=",".join(PHASES),
                        help="which phases to run; train runs only where no trained model is stored")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)  # a child process: one phase
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def memory_kib() -> dict[str, int]:
    """VmRSS and VmHWM of this process, in KiB."""
    with open("/proc/self/status") as status:
        fields = dict(line.split(":", 1) for line in status)
    return {name: int(fields[name].split()[0]) for name in ("VmRSS", "VmHWM")}


def reset_peak() -> None:
    """Set this process's resident high-water mark to its current resident size."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")


class Clock:
    """Wall and CPU seconds (this process, every thread) since it was made; CPU time counts what this process
    ran, so it moves less than wall time when other work shares the cores."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def _paths(args: argparse.Namespace, size: int) -> dict[str, Path]:
    folder = args.work / f"n{size}"
    return {"index": folder / "index", "model": folder / "original.pt", "artifacts": folder / "artifacts"}


def _open_index(args: argparse.Namespace, size: int) -> Any:
    from tmu_core.index import TrainingIndex, ingest_zip

    path = _paths(args, size)["index"]
    if (path / "index.sqlite").is_file():
        return TrainingIndex.open(path)
    return ingest_zip(args.zip, path, train_per_class=size // 10, test_per_class=args.test_per_class)


def _forget_ids(train_ids: list[str], count: int) -> tuple[str, ...]:
    """A seeded random draw of ``count`` training ids (the same for every phase of a size)."""
    from tmu_core.device import generator

    order = torch.randperm(len(train_ids), generator=generator(1)).tolist()
    return tuple(sorted(train_ids[i] for i in order[:count]))


def phase_train(args: argparse.Namespace, size: int) -> dict[str, Any]:
    """Train the original model (the quickstart's recipe) on every training sample and store it."""
    from tmu_core.train import TrainConfig, save_checkpoint, train_model

    model_path = _paths(args, size)["model"]
    with _open_index(args, size) as index:
        if model_path.is_file():
            return {}
        cfg = TrainConfig(epochs=args.epochs, batch_size=64, lr=0.05, augment=False, seed=0)
        clock = Clock()
        result = train_model(index, index.ids("train"), "small_cnn", cfg, "cpu")
        seconds, cpu = clock.read()
    model_path.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model_path, result.model, result.meta)
    return {"train_s": seconds, "train_cpu_s": cpu, "train_acc": result.history.train_acc[-1]}


def phase_prepare(args: argparse.Namespace, size: int) -> dict[str, Any]:
    """TMU's preparation (timed, peak memory), then one forget request with a fresh method instance."""
    import shutil

    from tmu_core.forget.artifacts import plan_data, prepare
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import load_checkpoint
    from tmu_core.unlearn import UnlearnData, get_method

    # Imported on the first Adam step: a worker process's one-time cost, not the request's.
    importlib.import_module("torch._dynamo")
    device = torch.device("cpu")
    paths = _paths(args, size)
    shutil.rmtree(paths["artifacts"], ignore_errors=True)
    model, meta = load_checkpoint(paths["model"], device)
    with _open_index(args, size) as index:
        plan = plan_data(index, 0.5, 0, index.ids("train"))
        view = index.view(Preprocess.from_meta(meta))
        before = memory_kib()["VmRSS"]
        reset_peak()
        clock = Clock()
        prepare(get_method("tmu"), model, meta, view, plan, device, paths["artifacts"])
        prepare_s, prepare_cpu = clock.read()
        peak = memory_kib()["VmHWM"]

        clock = Clock()
        method = get_method("tmu")  # a job's worker starts with a fresh method and reads the stored files
        forget = _forget_ids(list(plan.train_ids), args.forget)
        reload_s = prepare(method, model, meta, view, plan, device, paths["artifacts"])
        retain = tuple(i for i in plan.train_ids if i not in set(forget))
        data = UnlearnData(view, forget, retain, plan.twin_ids)
        outcome = method.unlearn(model, meta, data, device, paths["artifacts"])
        forget_s, forget_cpu = clock.read()
    return {"prepare_s": prepare_s, "prepare_cpu_s": prepare_cpu, "rss_before_mib": before / 1024,
            "prepare_peak_mib": peak / 1024, "forget_s": forget_s, "forget_cpu_s": forget_cpu,
            "reload_s": reload_s, "unlearn_s": outcome.seconds, "prepared": outcome.details["prepared"],
            "steps": outcome.details["steps"], "twin_size": len(plan.twin_ids)}


def phase_retrain(args: argparse.Namespace, size: int) -> dict[str, Any]:
    """The ``retrain`` method on D_r (the training set without the forget samples)."""
    from tmu_core.preprocess import Preprocess
    from tmu_core.train import load_checkpoint
    from tmu_core.unlearn import UnlearnData, get_method

    model, meta = load_checkpoint(_paths(args, size)["model"], "cpu")
    with _open_index(args, size) as index:
        train_ids = index.ids("train")
        forget = _forget_ids(train_ids, args.forget)
        retain = tuple(i for i in train_ids if i not in set(forget))
        data = UnlearnData(index.view(Preprocess.from_meta(meta)), forget, retain)
        clock = Clock()
        outcome = get_method("retrain").unlearn(model, meta, data, torch.device("cpu"))
        seconds, cpu = clock.read()
    return {"retrain_s": seconds, "retrain_cpu_s": cpu, "retrain_acc": outcome.details["train_accuracy"]}


def run_child(args: argparse.Namespace) -> None:
    action = {"train": phase_train, "prepare": phase_prepare, "retrain": phase_retrain}[args.phase]
    print(json.dumps(action(args, args.size)))


def _spawn(args: argparse.Namespace, phase: str, size: int) -> dict[str, Any]:
    command = [sys.executable, __file__, "--work", str(args.work), "--zip", str(args.zip), "--epochs",
               str(args.epochs), "--test-per-class", str(args.test_per_class), "--forget", str(args.forget),
               "--phase", phase, "--size", str(size)]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


# (title, keys, joiner): a cell shows its keys' values joined by the joiner; the growth row compares the
# last size with the first for every key but a memory column's "before" value.
COLUMNS = [("N train", ("size",), ""),
           ("original training s (wall / CPU)", ("train_s", "train_cpu_s"), " / "),
           ("retrain s (wall / CPU)", ("retrain_s", "retrain_cpu_s"), " / "),
           ("TMU prepare s (wall / CPU)", ("prepare_s", "prepare_cpu_s"), " / "),
           ("prepare peak RSS MiB (RSS before it)", ("prepare_peak_mib", "rss_before_mib"), " "),
           ("forget request s (wall / CPU)", ("forget_s", "forget_cpu_s"), " / ")]


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.1f}"
    return f"{value:,}" if isinstance(value, int) else "-"


def _cell(row: dict[str, Any], keys: tuple[str, ...], joiner: str) -> str:
    shown = [_number(row.get(key)) for key in keys]
    if joiner == " ":  # a value and, in brackets, the one it is measured against
        return f"{shown[0]} ({shown[1]})"
    return joiner.join(shown)


def _growth(rows: list[dict[str, Any]], keys: tuple[str, ...], joiner: str) -> str:
    ratios = []
    for key in keys[:1] if joiner == " " else keys:
        first, last = rows[0].get(key), rows[-1].get(key)
        ratios.append(f"x{last / first:.2f}" if first and last else "-")
    return " / ".join(ratios)


def print_table(rows: list[dict[str, Any]]) -> None:
    print("| " + " | ".join(title for title, _, _ in COLUMNS) + " |")
    print("|" + " --- |" * len(COLUMNS))
    for row in rows:
        print("| " + " | ".join(_cell(row, keys, joiner) for _, keys, joiner in COLUMNS) + " |")
    if len(rows) > 1:
        cells = [f"growth, x{rows[-1]['size'] / rows[0]['size']:.0f} the size"]
        cells += [_growth(rows, keys, joiner) for _, keys, joiner in COLUMNS[1:]]
        print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.phase is not None:
        run_child(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    phases = [p for p in PHASES if p in args.phases.split(",")]
    print(f"load average at the start: {os.getloadavg()}", file=sys.stderr, flush=True)
    rows = []
    for size in sizes:
        row: dict[str, Any] = {"size": size}
        for phase in phases:
            row.update(_spawn(args, phase, size))
            print(f"n={size} {phase} done: {json.dumps(row)}", file=sys.stderr, flush=True)
        rows.append(row)
    print_table(rows)
    print(f"load average at the end: {os.getloadavg()}", file=sys.stderr, flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
