"""Serving: ONNX export and check, ``.mar`` packaging, TorchServe control and clients, inference helpers.

``handler/tmu_handler.py`` (loaded by TorchServe workers) adapts :mod:`tmu_core.serving.inference`.
Nothing here imports TorchServe's ``ts`` package.
"""

from tmu_core.serving.archive import PackageResult, ServingOptions, package_version
from tmu_core.serving.clients import InferenceClient, ManagementClient, ModelVersionInfo, Prediction
from tmu_core.serving.export import OnnxCheck, export_onnx
from tmu_core.serving.keeper import KeyKeeper, RenewalSettings
from tmu_core.serving.keys import KeyRing, renew_key
from tmu_core.serving.torchserve import ServerStatus, TokenKeys, TorchServe, TorchServeConfig

__all__ = [
    "InferenceClient",
    "KeyKeeper",
    "KeyRing",
    "ManagementClient",
    "ModelVersionInfo",
    "OnnxCheck",
    "PackageResult",
    "Prediction",
    "RenewalSettings",
    "ServerStatus",
    "ServingOptions",
    "TokenKeys",
    "TorchServe",
    "TorchServeConfig",
    "export_onnx",
    "package_version",
    "renew_key",
]
