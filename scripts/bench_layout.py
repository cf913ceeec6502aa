"""Benchmark: the CPU's convolutions on images in the default (N, C, H, W) memory order against channels-last.

``tmu_core.train.loops.to_float`` hands every CPU batch of training, unlearning and evaluation to the model in
channels-last order (``tmu_core.device.cpu_layout``). This script times the same work both ways, the two
interleaved so that a change in the machine's load hits both, and prints a table: the median of ``--repeats``
timings, in milliseconds an image, and the ratio. Rows:

- ``small_cnn`` (32x32, the ``cpu-small`` network): a forward pass of 256 images (TMU's guard measures 256 held-out
  images after each fine-tune step) and one train-mode Adam step on 96 (about the size of a fine-tune step's hard,
  easy, retained and held-out batches together; TMU's fine-tune itself runs in eval mode);
- torchvision's ResNet-18 (224x224, 10 classes): a forward pass of 4 images (the torch serving backend's batch)
  and one train-mode Adam step on 8.

Each input is put in its order once, outside the timed calls; ``to_float`` pays that copy on every batch, on the
uint8 images.

Seeded random weights and inputs; nothing is read from disk. Example::

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_layout.py --threads 1 2
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torchvision
from torch import nn

from tmu_core.models.cnn import SmallCNN

ORDERS = {"default": torch.contiguous_format, "channels-last": torch.channels_last}


def _forward(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.inference_mode():
            model(x)
    return run


def _step(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-4)
    labels = torch.zeros(x.shape[0], dtype=torch.long)

    def run() -> None:
        optimiser.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), labels).backward()
        optimiser.step()
    return run


def _time(run: Callable[[], None], calls: int) -> float:
    run()  # warm-up
    started = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - started) / calls


def measure(model: nn.Module, shape: tuple[int, ...], kind: str, repeats: int, calls: int) -> dict[str, float]:
    """Median seconds a call of ``kind`` (``forward`` or ``step``) per memory order, the orders interleaved."""
    torch.manual_seed(0)
    base = torch.rand(shape)
    model.train(kind == "step")
    runs = {order: (_forward if kind == "forward" else _step)(model, base.contiguous(memory_format=fmt))
            for order, fmt in ORDERS.items()}
    seconds: dict[str, list[float]] = {order: [] for order in ORDERS}
    for _ in range(repeats):
        for order, run in runs.items():
            seconds[order].append(_time(run, calls))
    return {order: statistics.median(values) for order, values in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    # (name, model, input shape, work, calls timed together in one repeat)
    cases = [
        ("small_cnn 32x32", lambda: SmallCNN(10), (256, 3, 32, 32), "forward", 10),
        ("small_cnn 32x32", lambda: SmallCNN(10), (96, 3, 32, 32), "step", 10),
        ("resnet18 224x224", lambda: torchvision.models.resnet18(num_classes=10), (4, 3, 224, 224), "forward", 5),
        ("resnet18 224x224", lambda: torchvision.models.resnet18(num_classes=10), (8, 3, 224, 224), "step", 2),
    ]
    print("| model | work | threads | default ms an image | channels-last ms an image | speed-up |")
    print("| --- | --- | --- | --- | --- | --- |")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for name, build, shape, kind, calls in cases:
            torch.manual_seed(0)
            medians = measure(build(), shape, kind, args.repeats, calls)
            per = {order: 1000.0 * value / shape[0] for order, value in medians.items()}
            print(f"| {name} | {kind} of {shape[0]} | {threads} | {per['default']:.2f} | {per['channels-last']:.2f} "
                  f"| {per['default'] / per['channels-last']:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
