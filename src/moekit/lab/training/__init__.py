"""The run driver: TOML run configs, one training run end to end (data, model, trainer, plots, summary), and
``moekit compare``."""

from moekit.lab.training.run_config import RunConfig, load_run_config

__all__ = ["RunConfig", "load_run_config"]
