"""A training index as one model version reads it: every image through the version's ``Preprocess``.

Training, preparation, unlearning and evaluation of a version take an ``IndexView`` where they would take the
index, so the pixels a model learns from and forgets are the ones the TorchServe handler gives it for the
same photo. Everything but image reads (ids, labels, owners, forgetting) is the index's own.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from tmu_core.preprocess import Preprocess

if TYPE_CHECKING:
    from tmu_core.index.store import TrainingIndex


class IndexView:
    """``index`` read through ``preprocess``; make one with :meth:`TrainingIndex.view`.

    Attributes:
        index: the underlying :class:`TrainingIndex` (closing the view closes nothing).
        preprocess: applied to every image read.
        image_shape: (C, size, size) of every image read through the view.
    """

    def __init__(self, index: "TrainingIndex", preprocess: Preprocess) -> None:
        self.index = index
        self.preprocess = preprocess
        self.image_shape = (preprocess.channels, preprocess.size, preprocess.size)

    def load(self, ids: list[str], device: torch.device | str = "cpu") -> torch.Tensor:
        """uint8 (N, C, size, size) of live samples, in the order of ``ids`` (see :meth:`TrainingIndex.load`)."""
        return self.index.load(ids, device, preprocess=self.preprocess)

    def iter_batches(self, ids: list[str], batch_size: int,
                     device: torch.device | str = "cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Batches of (uint8 images, labels) over ``ids`` (see :meth:`TrainingIndex.iter_batches`)."""
        return self.index.iter_batches(ids, batch_size, device, preprocess=self.preprocess)

    def view(self, preprocess: Preprocess) -> "IndexView":
        """The same index through another preprocessing."""
        return IndexView(self.index, preprocess)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names the view does not define: ids, labels, lookup, classes, fingerprint, ...
        return getattr(self.index, name)

    def __repr__(self) -> str:
        return f"IndexView({self.index.root}, {self.preprocess})"
