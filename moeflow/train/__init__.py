"""Training: run config, data, trainer, checkpoints, metrics (`moeflow train`)."""

from moeflow.train.config import (
    CheckpointConfig,
    DataConfig,
    MetricsConfig,
    OptimConfig,
    ParallelConfig,
    RunConfig,
    TrainConfig,
)
from moeflow.train.trainer import Trainer, TrainResult, train

__all__ = [
    "CheckpointConfig",
    "DataConfig",
    "MetricsConfig",
    "OptimConfig",
    "ParallelConfig",
    "RunConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "train",
]
