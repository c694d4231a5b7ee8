"""A run config: the TOML file with sections ``[model]``, ``[moe]``, ``[data]``, ``[train]`` and
``[parallel]``, parsed once into typed dataclasses (:class:`RunConfig`).

``model.arch`` picks the task (:mod:`moekit.lab.training.tasks`): "lm" (default; a
:class:`~moekit.models.TransformerLM` on a text corpus: ``[model]`` = :class:`~moekit.models.config.LMConfig`,
``[data]`` = :class:`DataConfig`) or "vit" (a :class:`~moekit.models.ViT` on an image set: ``[model]`` =
:class:`~moekit.models.vit.ViTConfig`, ``[data]`` = :class:`ImageDataConfig`). ``[moe]`` is the model config's
``moe``: a :class:`~moekit.layers.config.MoEConfig`, or with ``moe.router = "soft"`` a
:class:`~moekit.layers.config.SoftMoEConfig` (ViT only: Soft MoE is not causal); no ``[moe]`` section: a dense
model.

Every key is checked (unknown keys are errors with a "did you mean"; bad values name the key and the rule) when the
file is read, so ``moekit validate`` and ``moekit train`` refuse a bad config before any work starts. TOML has no
null: the string ``"none"`` stands for None (``moe.capacity_factor = "none"`` is dropless routing). The resolved
config, every default filled in (:meth:`RunConfig.resolved`), is written back as ``config.toml`` in the run
directory by a small writer here (no TOML-writing dependency) and reads back to an equal :class:`RunConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.config import check_int, check_positive_number, config_from_dict, suggest
from moekit.errors import ConfigError, MoekitError
from moekit.lab.data.config import DataConfig, ImageDataConfig
from moekit.lab.training.tasks import ARCHS, Task, moe_table, task_for_arch, task_of
from moekit.layers.config import MoEConfig, SoftMoEConfig
from moekit.models.config import LMConfig
from moekit.models.vit import ViTConfig
from moekit.training.config import TrainConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on 3.10 only
    import tomli as tomllib

__all__ = [
    "RunConfig",
    "ParallelConfig",
    "build_run_config",
    "load_run_config",
    "parse_overrides",
    "to_toml",
    "find_named_config",
    "SECTIONS",
    "ARCHS",
    "DEFAULT_CONFIG_NAME",
]

SECTIONS = ("model", "moe", "data", "train", "parallel")
DEFAULT_CONFIG_NAME = "switch-tiny"

# The built-in defaults are exactly configs/switch-tiny.toml (a test checks it), so `moekit train` works
# anywhere.
_DEFAULT_MODEL = {
    "d_model": 128,
    "n_layers": 4,
    "n_heads": 4,
    "d_ff": 512,
    "moe_every": 2,
    "moe_offset": 1,
    "z_loss_coef": 0.0,
}
_DEFAULT_MOE = {"num_experts": 8, "top_k": 1, "capacity_factor": 1.25, "jitter_eps": 1e-2, "init_scale": 0.1}


@dataclass
class ParallelConfig:
    """Attributes:
    expert_parallel: processes the experts are spread over (``torchrun --nproc_per_node N``; must divide the
        number of experts). 1: one process.
    timeout_s: how long a rank waits in a collective before giving up with an error (a peer died or hangs).
    """

    expert_parallel: int = 1
    timeout_s: float = 300.0

    def __post_init__(self) -> None:
        check_int("parallel.expert_parallel", self.expert_parallel, 1)
        check_positive_number("parallel.timeout_s", self.timeout_s)


@dataclass
class RunConfig:
    """All sections of a run, typed. ``model`` is the task's model config (:class:`LMConfig` or
    :class:`ViTConfig`) with the ``[moe]`` section as its ``moe``; an LMConfig's ``vocab_size`` is
    ``data.vocab_size`` (the tokenizer's target; the model is built with the trained tokenizer's vocabulary).
    Checks across sections run on construction (and again when a caller changes a section and calls
    ``__post_init__``)."""

    model: LMConfig | ViTConfig
    data: DataConfig | ImageDataConfig
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def task(self) -> Task:
        """The task of this run's model (:mod:`moekit.lab.training.tasks`)."""
        return task_of(self.model)

    @property
    def arch(self) -> str:
        return self.task.arch

    @property
    def moe(self) -> MoEConfig | SoftMoEConfig | None:
        """The ``[moe]`` section (None for a dense model)."""
        return self.task.moe_of(self.model)

    def __post_init__(self) -> None:
        task = self.task
        if not isinstance(self.data, task.data_config):
            raise ConfigError(f"model.arch = {task.arch!r} needs a [data] section of {task.data_config.__name__} keys")
        task.check(self)
        ep = self.parallel.expert_parallel
        if ep > 1:
            moe = self.moe
            if moe is None:
                raise ConfigError("parallel.expert_parallel > 1 needs a MoE model (a [moe] section)")
            if moe.num_experts % ep != 0:
                raise ConfigError(
                    f"parallel.expert_parallel = {ep} must divide moe.num_experts = {moe.num_experts}: each rank "
                    "holds num_experts / expert_parallel experts (the experts are not divisible otherwise)"
                )
            if self.train.batch_size % ep != 0:
                raise ConfigError(
                    f"train.batch_size = {self.train.batch_size} (the global batch) must be a multiple of "
                    f"parallel.expert_parallel = {ep}: every rank takes an equal share"
                )

    def resolved(self) -> dict[str, dict[str, Any]]:
        """Every section with every default filled in (what ``config.toml`` in a run holds, and checkpoints store);
        :func:`build_run_config` reads it back to an equal RunConfig."""
        out: dict[str, dict[str, Any]] = {"model": self.task.model_table(self.model)}
        if self.moe is not None:
            out["moe"] = moe_table(self.moe)
        out["data"] = dataclasses.asdict(self.data)
        out["train"] = dataclasses.asdict(self.train)
        out["parallel"] = dataclasses.asdict(self.parallel)
        return out


def _none(value: Any) -> Any:
    if isinstance(value, str) and value.strip().lower() == "none":
        return None
    if isinstance(value, dict):
        return {k: _none(v) for k, v in value.items()}
    return value


def build_run_config(tables: dict[str, Any]) -> RunConfig:
    """Parse TOML tables into a :class:`RunConfig` (strict keys): ``[data]``, ``[train]`` and ``[parallel]``
    first, then ``[model]`` and ``[moe]`` by the task of ``model.arch``."""
    for key in tables:
        if key not in SECTIONS:
            raise ConfigError(
                f"unknown config section [{key}]{suggest(key, SECTIONS)}; sections: {', '.join(SECTIONS)}"
            )
    for key, value in tables.items():
        if not isinstance(value, dict):
            raise ConfigError(f"[{key}] must be a table of key = value pairs, got {type(value).__name__}")
    tables = _none(tables)
    model = dict(tables.get("model", {}))
    moe = dict(tables["moe"]) if tables.get("moe") else None
    task = task_for_arch(model.get("arch", "lm"))  # first: it decides which keys [data] may hold
    data = config_from_dict(task.data_config, tables.get("data", {}), "data")
    train = config_from_dict(TrainConfig, tables.get("train", {}), "train")
    parallel = config_from_dict(ParallelConfig, tables.get("parallel", {}), "parallel")
    return RunConfig(model=task.parse_model(model, moe, data), data=data, train=train, parallel=parallel)


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.max_steps=10", "data.corpus=sotu"]`` -> nested tables. Values are TOML (``10``, ``1e-3``,
    ``true``, ``"x"``); anything that does not parse as TOML is taken as a string."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        path, raw = item.split("=", 1)
        if path.count(".") != 1:
            raise ConfigError(f"--set expects section.key=value (one dot), got {path!r}")
        section, key = path.strip().split(".")
        try:
            value = tomllib.loads(f"v = {raw}")["v"]
        except tomllib.TOMLDecodeError:
            value = raw
        out.setdefault(section, {})[key] = value
    return out


def find_named_config(name: str) -> Path | None:
    """``configs/<name>.toml`` in the working directory or beside the package's source tree."""
    candidates = [Path.cwd() / "configs", Path(__file__).resolve().parents[4] / "configs"]
    for folder in candidates:
        path = folder / f"{name}.toml"
        if path.is_file():
            return path
    return None


def load_run_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a TOML run config (a path, or a name from ``configs/``; None: the built-in default), apply
    ``--set`` overrides, and validate everything."""
    tables: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            named = find_named_config(str(path))
            if named is None:
                raise MoekitError(f"config file {str(path)!r} not found (give a .toml path or a name from configs/)")
            p = named
        try:
            tables = tomllib.loads(p.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as exc:
            raise MoekitError(f"{p}: not valid TOML: {exc}") from None
        except UnicodeDecodeError:
            raise MoekitError(f"{p}: not UTF-8 text") from None
    else:
        tables = {"model": dict(_DEFAULT_MODEL), "moe": dict(_DEFAULT_MOE)}
    for section, values in parse_overrides(overrides or []).items():
        if section not in SECTIONS:
            raise ConfigError(f"--set: unknown section {section!r}{suggest(section, SECTIONS)}")
        tables.setdefault(section, {}).update(values)
    return build_run_config(tables)


def _toml_value(value: Any) -> str:
    if value is None:
        return '"none"'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic-string escapes
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise ValueError(f"cannot write {type(value).__name__} to TOML")


def to_toml(tables: dict[str, dict[str, Any]]) -> str:
    """Write one level of ``[section]`` tables of scalars and lists."""
    lines = []
    for section, values in tables.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)
