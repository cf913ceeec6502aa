"""How well a twin part of held-out images predicts the gold's accuracy on a forgotten class, by its size.

TMU's easy count for a class-shaped forget set is, in effect, that class's easy rate on the twin images (the
held-out images M_o never trained on). This script measures the error of that estimate against what it stands
for: the gold's accuracy on all of the class's test images. For each seed of the ``cpu-small`` protocol and each
forget class, it draws ``--draws`` twin parts of ``--twin-per-class`` images a class from the zip's test split
and compares two estimates with the gold's accuracy:

- ``rate``: the share of the class's twin images M_o classifies correctly (the prior shift off);
- ``shifted``: that share times the class's factor from ``tmu_core.unlearn.easy_hard.shift_scale`` (on).

The original and gold models come from the evaluation cache (``tmu-admin evaluate --cache-dir``), trained there
first when missing (one original and one gold a class and seed, about a minute each on two cores):

    OMP_NUM_THREADS=2 .venv/bin/python scripts/bench_class_share.py --data ../shared/data/cifar10-jpeg.zip \\
        --cache-dir /tmp/tmu-cache --seeds 0,1,2,3,4

Twin images are drawn from all of the class's test images, so they overlap the images the gold is scored on;
with 1,000 test images a class that shares at most 40% of them at the largest size.
"""

from __future__ import annotations

import argparse
import math
import statistics
from dataclasses import replace
from pathlib import Path

import torch


def _numbers(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cifar10-jpeg.zip"))
    parser.add_argument("--cache-dir", type=Path, required=True)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--twin-per-class", default="25,50,100,200,400")
    parser.add_argument("--draws", type=int, default=20)
    args = parser.parse_args()

    from tmu_core.evaluate import builtin_protocol
    from tmu_core.evaluate.cache import open_index, open_wide_index, trained_model
    from tmu_core.evaluate.splits import draw_forget_sets
    from tmu_core.train import predict_logits
    from tmu_core.unlearn.easy_hard import shift_scale

    device = torch.device("cpu")
    protocol = builtin_protocol("cpu-small", args.data)
    index = open_index(protocol.source, args.cache_dir)
    preprocess = protocol.source.preprocess(index.image_shape[0] if index.image_shape else 3)
    with open_wide_index(protocol.source, args.cache_dir) as wide:
        test_ids = wide.ids("test")
        reader = wide if preprocess is None else wide.view(preprocess)
        test_images, test_labels = reader.load(test_ids), torch.as_tensor(wide.labels(test_ids), dtype=torch.long)
    train_ids = index.ids("train")
    counts = torch.bincount(torch.as_tensor(index.labels(train_ids), dtype=torch.long), minlength=len(index.classes))
    sizes = _numbers(args.twin_per_class)
    errors: dict[tuple[int, str], list[float]] = {}

    def logits_of(ids: list[str], seed: int, role: str) -> torch.Tensor:
        cfg = replace(protocol.train, seed=seed)
        trained = trained_model(index, ids, protocol.arch, cfg, protocol.source, args.cache_dir, device, role)
        return predict_logits(trained.model, test_images, device, 500)

    for seed in _numbers(args.seeds):
        original = logits_of(train_ids, seed, "original")
        draws = draw_forget_sets(index, "class", seed, classes=protocol.forget_classes, size=protocol.forget_size)
        for draw in draws:
            forgotten = set(draw.forget_ids)
            gold = logits_of([i for i in train_ids if i not in forgotten], seed, "gold")
            mine = test_labels == draw.forget_class
            target = 100.0 * (gold[mine].argmax(1) == draw.forget_class).float().mean().item()
            share = torch.ones(len(counts))
            share[draw.forget_class] = 1.0 - len(forgotten) / float(counts[draw.forget_class])
            generator = torch.Generator().manual_seed(1000 * seed + draw.forget_class)
            for size in sizes:
                for _ in range(args.draws):
                    rows = torch.cat([(test_labels == c).nonzero().squeeze(1)[
                        torch.randperm(int((test_labels == c).sum()), generator=generator)[:size]]
                        for c in range(len(counts))])
                    logits, labels = original[rows], test_labels[rows]
                    factors, _ = shift_scale(logits, labels, share)
                    own = labels == draw.forget_class
                    rate = 100.0 * (logits[own].argmax(1) == draw.forget_class).float().mean().item()
                    errors.setdefault((size, "rate"), []).append(rate - target)
                    errors.setdefault((size, "shifted"), []).append(rate * float(factors[draw.forget_class]) - target)
    index.close()

    print(f"seeds {args.seeds}, classes {','.join(map(str, protocol.forget_classes))}, "
          f"{protocol.forget_size} forgotten a class, {args.draws} twin draws each")
    print("| twin images a class | estimate | mean error | mean abs error | RMSE |")
    print("| --- | --- | --- | --- | --- |")
    for (size, name), values in sorted(errors.items()):
        rmse = math.sqrt(statistics.mean(v * v for v in values))
        print(f"| {size} | {name} | {statistics.mean(values):+.1f} | {statistics.mean(map(abs, values)):.1f} | "
              f"{rmse:.1f} |")


if __name__ == "__main__":
    main()
