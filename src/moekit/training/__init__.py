"""Training: the trainer, optimizers, schedules, non-finite policy, atomic checkpoints and the run driver."""

from moekit.training.adafactor import Adafactor
from moekit.training.config import TrainConfig
from moekit.training.run_config import RunConfig, load_run_config
from moekit.training.trainer import Trainer, TrainResult

__all__ = ["Adafactor", "RunConfig", "TrainConfig", "TrainResult", "Trainer", "load_run_config"]
