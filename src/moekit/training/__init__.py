"""Training: the trainer, optimizers, schedules, non-finite policy, metrics and atomic checkpoints. The run driver
(config files, data preparation, plots, ``moekit compare``) is in :mod:`moekit.lab.training`."""

from moekit.training.adafactor import Adafactor
from moekit.training.config import TrainConfig
from moekit.training.trainer import Trainer, TrainResult

__all__ = ["Adafactor", "TrainConfig", "TrainResult", "Trainer"]
