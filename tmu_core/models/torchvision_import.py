"""torchvision classification architectures as :class:`Classifier` models (``torchvision:<name>``).

A torchvision network is rebuilt by name with ``torchvision.models.get_model(name, weights=None, num_classes=K)``
(never downloading weights), its final ``nn.Linear`` is found generically and becomes ``head``, and the rest
of the network, with that layer replaced by ``nn.Identity``, becomes ``trunk``: so ``features(x)`` is the input
of the final linear layer, the penultimate activations TMU needs. The mean/std buffers default to those of
the architecture's torchvision weights, read offline from ``get_model_weights(name).DEFAULT.transforms``.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tmu_core.errors import InvalidInputError
from tmu_core.models.registry import Classifier, register_namespace

logger = logging.getLogger(__name__)

NAMESPACE = "torchvision"
# Family -> architecture-name prefixes accepted (the classification families tmu-serve supports).
FAMILIES: dict[str, tuple[str, ...]] = {
    "resnet": ("resnet", "resnext", "wide_resnet"),
    "mobilenet": ("mobilenet_v2", "mobilenet_v3"),
    "efficientnet": ("efficientnet_b", "efficientnet_v2"),
    "regnet": ("regnet_",),
    "convnext": ("convnext_",),
    "densenet": ("densenet",),
    "vit": ("vit_",),
    "swin": ("swin_",),
}


def supported_architectures() -> list[str]:
    """torchvision classification architectures of the supported families, sorted."""
    import torchvision

    prefixes = tuple(p for group in FAMILIES.values() for p in group)
    return sorted(n for n in torchvision.models.list_models(module=torchvision.models) if n.startswith(prefixes))


def check_architecture(name: str) -> str:
    """``name`` itself when it is a supported torchvision architecture.

    Raises:
        InvalidInputError: unknown or unsupported name (the message lists the supported ones).
    """
    valid = supported_architectures()
    if name not in valid:
        raise InvalidInputError(f"unknown torchvision architecture {name!r}; supported: {', '.join(valid)}")
    return name


@dataclass(frozen=True)
class WeightsTransforms:
    """What the architecture's default torchvision weights do to an image before the model.

    Attributes:
        crop: centre-crop size (the model's input side).
        resize: shorter side before the crop.
        interpolation: ``bilinear``, ``bicubic`` or ``nearest``.
        mean: per-channel mean in [0, 1].
        std: per-channel std in [0, 1].
    """

    crop: int
    resize: int
    interpolation: str
    mean: tuple[float, ...]
    std: tuple[float, ...]


def weights_transforms(name: str) -> WeightsTransforms:
    """The eval transforms of ``name``'s default weights, read from their metadata (nothing is downloaded)."""
    from torchvision.models import get_model_weights

    preset = get_model_weights(check_architecture(name)).DEFAULT.transforms  # functools.partial(ImageClassification)
    defaults = {k: p.default for k, p in inspect.signature(preset.func.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    values = {**defaults, **preset.keywords}
    interpolation = values["interpolation"]
    return WeightsTransforms(crop=int(values["crop_size"]), resize=int(values["resize_size"]),
                             interpolation=str(getattr(interpolation, "value", interpolation)),
                             mean=tuple(float(v) for v in values["mean"]), std=tuple(float(v) for v in values["std"]))


def build_network(name: str, num_classes: int, image_size: int) -> nn.Module:
    """The bare torchvision network, randomly initialised (ViTs are built for ``image_size``)."""
    from torchvision.models import get_model

    extra = {"image_size": image_size} if name.startswith("vit_") else {}
    try:
        return get_model(check_architecture(name), weights=None, num_classes=num_classes, **extra)
    except (ValueError, TypeError) as err:
        raise InvalidInputError(f"cannot build torchvision {name} for {num_classes} classes at "
                                f"{image_size}x{image_size}: {err}") from err


def find_head(net: nn.Module, num_classes: int, probe: torch.Tensor) -> str:
    """The name of ``net``'s final ``nn.Linear``: the one whose input, with it replaced by ``nn.Identity``,
    is what ``net`` returns and which maps that to the logits.

    Args:
        net: the classifier network (its mode is restored).
        num_classes: its number of logits.
        probe: an input batch it accepts, e.g. (2, 3, S, S).

    Raises:
        InvalidInputError: no such layer, or several candidates and none (or more than one) fits; the message
            names the candidates.
    """
    candidates = [n for n, m in net.named_modules() if isinstance(m, nn.Linear) and m.out_features == num_classes]
    if not candidates:
        linears = [f"{n} ({m.in_features}->{m.out_features})" for n, m in net.named_modules()
                   if isinstance(m, nn.Linear)]
        raise InvalidInputError(f"no nn.Linear with {num_classes} outputs (the number of classes) in "
                                f"{type(net).__name__}; linear layers: {linears or 'none'}")
    was_training = net.training
    net.eval()
    try:
        with torch.inference_mode():
            logits = net(probe)
            fitting = [n for n in candidates if _is_final(net, n, probe, logits)]
    finally:
        net.train(was_training)
    if len(fitting) == 1:
        return fitting[0]
    why = "none of them is the last layer" if not fitting else f"{fitting} all fit"
    raise InvalidInputError(
        f"cannot tell which nn.Linear of {type(net).__name__} is the classification head: candidates with "
        f"{num_classes} outputs are {candidates}, and {why} (the logits must be that layer applied to what the "
        "rest of the network returns)")


def _is_final(net: nn.Module, name: str, probe: torch.Tensor, logits: torch.Tensor) -> bool:
    head = net.get_submodule(name)
    net.set_submodule(name, nn.Identity())
    try:
        feats = net(probe)
    except Exception:  # a linear layer inside the network: its removal breaks the shapes after it
        return False
    finally:
        net.set_submodule(name, head)
    if not isinstance(feats, torch.Tensor) or feats.shape != (probe.shape[0], head.in_features):
        return False
    return torch.allclose(head(feats), logits, rtol=1e-4, atol=1e-5)


class TorchvisionClassifier(Classifier):
    """A torchvision network as a :class:`Classifier`: ``trunk`` is the network with its head replaced by
    ``nn.Identity``, ``head`` its final ``nn.Linear`` (whose weights it keeps).

    Attributes:
        head_path: where the head sat in the network (``fc``, ``classifier.3``, ``heads.head``, ...).
    """

    def __init__(self, net: nn.Module, num_classes: int, image_size: int, mean: Sequence[float],
                 std: Sequence[float], head_path: str | None = None) -> None:
        if head_path is None:
            probe = torch.randn(2, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
            head_path = find_head(net, num_classes, probe)
        head = net.get_submodule(head_path)
        net.set_submodule(head_path, nn.Identity())
        super().__init__(net, head.in_features, num_classes, 3, image_size, mean, std)
        self.head = head
        self.head_path = head_path


def build_torchvision(name: str, num_classes: int, in_channels: int = 3, image_size: int = 224,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      state_dict: Mapping[str, torch.Tensor] | None = None) -> TorchvisionClassifier:
    """``torchvision:<name>`` as a :class:`Classifier` (the namespace builder of the registry).

    Args:
        name: a name from :func:`supported_architectures`, e.g. ``resnet50``.
        num_classes: number of logits.
        in_channels: must be 3 (torchvision classifiers take RGB).
        image_size: side of the model's square input.
        mean, std: normalisation; None for the weights' defaults (ImageNet's).
        state_dict: weights of the bare torchvision network (its own key names), loaded strictly.

    Raises:
        InvalidInputError: unknown architecture, ``in_channels`` other than 3, or weights that do not fit
            (the message lists missing and unexpected keys and differing shapes).
    """
    if in_channels != 3:
        raise InvalidInputError(f"torchvision architectures take 3-channel (RGB) images, got in_channels={in_channels}")
    net = build_network(name, num_classes, image_size)
    if state_dict is not None:
        load_strict(net, state_dict, f"torchvision {name}")
    if mean is None or std is None:
        transforms = weights_transforms(name)
        mean, std = mean or transforms.mean, std or transforms.std
    model = TorchvisionClassifier(net, num_classes, image_size, mean, std)
    model.arch = f"{NAMESPACE}:{name}"
    return model


def load_strict(net: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """``net.load_state_dict(state_dict, strict=True)`` with a message naming every difference.

    Raises:
        InvalidInputError: ``missing keys [...]; unexpected keys [...]; shapes differ: key: file (..) vs
            model (..)``, each list sorted.
    """
    own = net.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = sorted(f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state_dict)
                    if not isinstance(state_dict[k], torch.Tensor) or state_dict[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise InvalidInputError(f"weights do not fit {what}: missing keys {missing}; unexpected keys {unexpected}; "
                                f"shapes differ: {shapes}")
    net.load_state_dict(state_dict, strict=True)


def plain_state_dict(payload: Any, source: str) -> dict[str, torch.Tensor]:
    """The ``state_dict`` inside a loaded weights file: the dict itself, or its ``state_dict``/``model`` entry;
    a ``module.`` prefix on every key (``nn.DataParallel``) is dropped.

    Raises:
        InvalidInputError: no dict of tensors found.
    """
    if isinstance(payload, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(payload.get(key), Mapping):
                payload = payload[key]
                break
    if not isinstance(payload, Mapping) or not payload or not all(
            isinstance(v, torch.Tensor) for v in payload.values()):
        kind = sorted(payload)[:10] if isinstance(payload, Mapping) else type(payload).__name__
        raise InvalidInputError(f"{source}: expected a state_dict (a dict of tensors), got {kind}")
    state = {str(k): v for k, v in payload.items()}
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


register_namespace(NAMESPACE, build_torchvision)
