"""Device choice and seeding, decided once at the edge and passed down."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from tmu_core.errors import InvalidInputError


def resolve_device(name: str = "auto") -> torch.device:
    """Turn ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` into a device.

    Args:
        name: ``"auto"`` picks CUDA when it is available, else the CPU.

    Raises:
        InvalidInputError: CUDA was asked for and is not available, or the name is not a device.
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InvalidInputError(f"unknown device {name!r}; expected auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"device {name!r} asked for but CUDA is not available; use auto or cpu")
    return device


def seed_everything(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def set_deterministic(enabled: bool = True) -> None:
    """Ask torch for deterministic kernels (same seed, same device type, same weights)."""
    if enabled:
        # cuBLAS needs this workspace setting for deterministic matmuls on CUDA.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    torch.backends.cudnn.benchmark = not enabled
    torch.backends.cudnn.deterministic = enabled


def generator(seed: int) -> torch.Generator:
    """A CPU generator of its own, so splits and shuffles never touch the global RNG."""
    return torch.Generator().manual_seed(seed)


def cpu_layout(x: torch.Tensor) -> torch.Tensor:
    """``x`` in channels-last memory order when it is a batch of images (N, C, H, W) on the CPU, else as it is.

    The values and shape are the same, and the CPU's convolutions run faster on that order (BENCHMARKS.md,
    "Channels-last images on the CPU"). Only the images change order; the parameters keep theirs. Other devices
    are left as they are: the gain there is not measured.
    """
    if x.device.type == "cpu" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x
