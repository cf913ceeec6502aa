"""Architecture registry: ``small_cnn``, ``resnet18``, ``allcnn``, ``vit_small``, and ``torchvision:<name>``.

Every model is a :class:`Classifier`: float images in [0, 1] in, logits out, normalisation inside,
``features(x)`` for the penultimate activations and ``head`` for the last linear layer.
"""

from tmu_core.models.registry import Classifier, build_model, count_parameters, list_models, register_model

# Importing the architecture modules registers them.
from tmu_core.models import cnn, resnet, torchvision_import, vit  # noqa: E402,F401  isort: skip

__all__ = ["Classifier", "build_model", "count_parameters", "list_models", "register_model"]
