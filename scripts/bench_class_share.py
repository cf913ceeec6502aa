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

A second table is what ``tmu-admin evaluate`` itself draws from: the protocol's test part (its first
``test_per_class`` test images of each class, which every ``--split-seed`` splits into twin and eval images) against
all of the class's test images, under each seed's original, and the gold's accuracy on the forgotten samples
beside its accuracy on the class's test images.
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

    def model_of(ids: list[str], seed: int, role: str) -> torch.nn.Module:
        cfg = replace(protocol.train, seed=seed)
        return trained_model(index, ids, protocol.arch, cfg, protocol.source, args.cache_dir, device, role).model

    index_reader = index if preprocess is None else index.view(preprocess)
    part_ids = index.ids("test")
    part_images = index_reader.load(part_ids)
    part_labels = torch.as_tensor(index.labels(part_ids), dtype=torch.long)
    part_rows: list[str] = []

    def accuracy(logits: torch.Tensor, labels: torch.Tensor, cls: int) -> float:
        mine = labels == cls
        return 100.0 * (logits[mine].argmax(1) == cls).float().mean().item()

    for seed in _numbers(args.seeds):
        original_model = model_of(train_ids, seed, "original")
        original = predict_logits(original_model, test_images, device, 500)
        on_part = predict_logits(original_model, part_images, device, 500)
        draws = draw_forget_sets(index, "class", seed, classes=protocol.forget_classes, size=protocol.forget_size)
        for draw in draws:
            forgotten = set(draw.forget_ids)
            gold_model = model_of([i for i in train_ids if i not in forgotten], seed, "gold")
            gold = predict_logits(gold_model, test_images, device, 500)
            target = accuracy(gold, test_labels, draw.forget_class)
            on_forget = predict_logits(gold_model, index_reader.load(list(draw.forget_ids)), device, 500)
            forget_labels = torch.full((len(draw.forget_ids),), draw.forget_class)
            part_rows.append(f"| {seed} | {index.classes[draw.forget_class]} | "
                             f"{accuracy(on_part, part_labels, draw.forget_class):.1f} | "
                             f"{accuracy(original, test_labels, draw.forget_class):.1f} | {target:.1f} | "
                             f"{accuracy(on_forget, forget_labels, draw.forget_class):.1f} |")
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
    print(f"\nThe protocol's test part ({protocol.source.test_per_class} a class) against all of the class's "
          "test images")
    print("| seed | class | original on the part | original on all | gold on all | gold on the forgotten samples |")
    print("| --- | --- | --- | --- | --- | --- |")
    print("\n".join(part_rows))


if __name__ == "__main__":
    main()
