"""Training recipes, the training loop, inference helpers and checkpoints."""

from tmu_core.train.checkpoint import CheckpointMeta, load_checkpoint, save_checkpoint
from tmu_core.train.config import TrainConfig, TrainHistory, TrainResult
from tmu_core.train.fit import channel_stats, fit, train_model
from tmu_core.train.loops import accuracy, extract_features, predict_logits, to_float

__all__ = [
    "CheckpointMeta",
    "TrainConfig",
    "TrainHistory",
    "TrainResult",
    "accuracy",
    "channel_stats",
    "extract_features",
    "fit",
    "load_checkpoint",
    "predict_logits",
    "save_checkpoint",
    "to_float",
    "train_model",
]
