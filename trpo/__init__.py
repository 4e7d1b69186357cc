"""TRPO on natgrad: ``from trpo import TRPOConfig, config_for, train``."""

from trpo.config import TRPOConfig
from trpo.presets import PRESETS, config_for
from trpo.train import TrainingError, TrainResult, train

__all__ = ["PRESETS", "TRPOConfig", "TrainResult", "TrainingError", "config_for", "train"]
