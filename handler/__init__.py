"""The TorchServe custom handler. It is packed into every ``.mar`` as ``tmu_handler.py``."""
