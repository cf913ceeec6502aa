"""Tiny synthetic unlearning problem shared by the unlearning tests (no tests here).

Four classes of 3x8x8 images: each class is a smooth random pattern plus pixel noise. A share of the
training and twin samples carry a wrong label: the original model memorises them, a model that never saw
them gets them wrong, so they are "hard"; the rest are "easy".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tmu_core.device import generator
from tmu_core.models import build_model
from tmu_core.train import CheckpointMeta, TrainConfig, channel_stats, fit
from tmu_core.unlearn import TensorSource, UnlearnData

CLASSES = 4
SIZE = 8


@dataclass(frozen=True)
class Problem:
    source: TensorSource
    train_ids: tuple[str, ...]
    twin_ids: tuple[str, ...]
    flipped: frozenset[str]  # ids whose label is wrong (hard by construction)
    model: torch.nn.Module
    meta: CheckpointMeta

    def data(self, forget: tuple[str, ...]) -> UnlearnData:
        retain = tuple(i for i in self.train_ids if i not in set(forget))
        return UnlearnData(self.source, forget, retain, self.twin_ids)

    def forget_ids(self, label: int, count: int, seed: int = 0) -> tuple[str, ...]:
        """A seeded random draw of ``count`` training ids labelled ``label`` (noisy labels included)."""
        labels = self.source.labels(list(self.train_ids))
        ids = [i for i, y in zip(self.train_ids, labels.tolist()) if y == label]
        order = torch.randperm(len(ids), generator=generator(seed)).tolist()
        return tuple(sorted(ids[n] for n in order[:count]))


def _images(gen: torch.Generator, labels: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(labels.shape[0], 3, SIZE, SIZE, generator=gen) * 45.0
    return (prototypes[labels] + noise).clamp(0, 255).to(torch.uint8)


def _split(prefix: str, per_class: int, flip_rate: float, gen: torch.Generator, prototypes: torch.Tensor):
    labels = torch.arange(CLASSES).repeat_interleave(per_class)
    images = _images(gen, labels, prototypes)
    flip = torch.rand(labels.shape[0], generator=gen) < flip_rate
    noisy = labels.clone()
    noisy[flip] = (labels[flip] + torch.randint(1, CLASSES, (int(flip.sum()),), generator=gen)) % CLASSES
    ids = [f"{prefix}/{n:04d}" for n in range(labels.shape[0])]
    flipped = {ids[n] for n in flip.nonzero().squeeze(1).tolist()}
    return ids, images, noisy, flipped


def make_problem(seed: int = 0, per_class: int = 40, twin_per_class: int = 25, flip_rate: float = 0.2,
                 epochs: int = 25) -> Problem:
    """Data + an original model (small_cnn) trained to fit its training set, noisy labels included."""
    gen = generator(seed)
    coarse = torch.rand(CLASSES, 3, 3, 3, generator=gen)
    prototypes = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False) * 200 + 25
    train = _split("train", per_class, flip_rate, gen, prototypes)
    twin = _split("test", twin_per_class, flip_rate, gen, prototypes)
    ids = train[0] + twin[0]
    source = TensorSource(ids, torch.cat([train[1], twin[1]]), torch.cat([train[2], twin[2]]))
    cfg = TrainConfig(epochs=epochs, batch_size=40, lr=0.05, augment=False, seed=seed, amp=False)
    mean, std = channel_stats(train[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_model("small_cnn", CLASSES, 3, SIZE, mean, std)
    fit(model, train[1], train[2], cfg, "cpu")
    meta = CheckpointMeta(arch="small_cnn", num_classes=CLASSES, class_names=tuple("abcd"), in_channels=3,
                          image_size=SIZE, mean=mean, std=std, seed=seed, recipe=_recipe(cfg),
                          index_fingerprint="synthetic", train_size=len(train[0]))
    return Problem(source, tuple(train[0]), tuple(twin[0]), frozenset(train[3] | twin[3]), model.eval(), meta)


def _recipe(cfg: TrainConfig) -> dict:
    from dataclasses import asdict

    return asdict(cfg)


def state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)
