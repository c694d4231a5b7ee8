"""A run config: the TOML file with sections ``[model]``, ``[moe]``, ``[data]``, ``[train]`` and
``[parallel]``.

``model.arch`` picks the model: "lm" (default; :class:`~moekit.models.TransformerLM` on a text corpus,
``[data]`` = :class:`DataConfig`) or "vit" (:class:`~moekit.models.ViT` on an image set, ``[data]`` =
:class:`ImageDataConfig`). ``moe.router = "soft"`` makes the ``[moe]`` section a :class:`SoftMoEConfig`
(ViT only: Soft MoE is not causal).

Every key is checked (unknown keys are errors with a "did you mean"; bad values name the key and the rule)
when the
file is read, so ``moekit validate`` and ``moekit train`` refuse a bad config before any work starts. TOML has
no
null: the string ``"none"`` stands for None (``moe.capacity_factor = "none"`` is dropless routing). The
resolved
config, every default filled in, is written back as ``config.toml`` in the run directory by a small writer
here
(no TOML-writing dependency).
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
from moekit.errors import MoekitError
from moekit.lab.data.config import DataConfig, ImageDataConfig
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
    "DEFAULT_CONFIG_NAME",
]

SECTIONS = ("model", "moe", "data", "train", "parallel")
DEFAULT_CONFIG_NAME = "switch-tiny"
ARCHS = ("lm", "vit")


def _check_arch(arch: object) -> None:
    if arch not in ARCHS:
        raise ValueError(f"model.arch must be one of {ARCHS}, got {arch!r}{suggest(str(arch), ARCHS)}")
_MODEL_KEYS = [f.name for f in dataclasses.fields(LMConfig) if f.name not in ("vocab_size", "moe")] + ["arch"]
_VIT_KEYS = [f.name for f in dataclasses.fields(ViTConfig) if f.name != "moe"] + ["arch"]
_SOFT_KEYS = [f.name for f in dataclasses.fields(SoftMoEConfig)] + ["router"]


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
    """All sections of a run. ``model`` holds the ``[model]`` keys (``arch`` and the LMConfig fields but
    ``vocab_size`` and ``moe``, or the ViTConfig fields but ``moe``), ``moe`` the ``[moe]`` keys (MoEConfig
    fields, or SoftMoEConfig fields with ``router = "soft"``; None for a dense model)."""

    model: dict[str, Any] = field(default_factory=lambda: dict(_DEFAULT_MODEL))
    moe: dict[str, Any] | None = field(default_factory=lambda: dict(_DEFAULT_MOE))
    data: DataConfig | ImageDataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

    @property
    def arch(self) -> str:
        return self.model.get("arch", "lm")

    @property
    def is_vit(self) -> bool:
        return self.arch == "vit"

    def __post_init__(self) -> None:
        arch = self.arch
        _check_arch(arch)
        want = ImageDataConfig if arch == "vit" else DataConfig
        if not isinstance(self.data, want):
            raise ValueError(f"model.arch = {arch!r} needs a [data] section of {want.__name__} keys")
        if arch == "vit":
            self._check_vit()
            return
        for key in self.model:
            if key not in _MODEL_KEYS:
                hint = " (it is set by the tokenizer: use data.vocab_size)" if key == "vocab_size" else ""
                raise ValueError(
                    f"unknown config key 'model.{key}'{hint or suggest(key, _MODEL_KEYS)}; "
                    f"valid keys: {', '.join(_MODEL_KEYS)}"
                )
        self.model.setdefault("max_seq_len", self.data.seq_len)
        if self.data.seq_len > self.model["max_seq_len"]:
            raise ValueError(
                f"data.seq_len ({self.data.seq_len}) must be <= model.max_seq_len ({self.model['max_seq_len']})"
            )
        self.lm_config(self.data.vocab_size)  # runs every LMConfig / MoEConfig check now
        ep = self.parallel.expert_parallel
        if ep > 1:
            moe = self.moe_config()
            if moe is None:
                raise ValueError("parallel.expert_parallel > 1 needs a MoE model (a [moe] section)")
            if moe.num_experts % ep != 0:
                raise ValueError(
                    f"parallel.expert_parallel = {ep} must divide moe.num_experts = {moe.num_experts}: each rank "
                    "holds num_experts / expert_parallel experts (the experts are not divisible otherwise)"
                )
            if self.train.batch_size % ep != 0:
                raise ValueError(
                    f"train.batch_size = {self.train.batch_size} (the global batch) must be a multiple of "
                    f"parallel.expert_parallel = {ep}: every rank takes an equal share"
                )

    def _check_vit(self) -> None:
        keys = _VIT_KEYS
        for key in self.model:
            if key not in keys:
                raise ValueError(
                    f"unknown config key 'model.{key}'{suggest(key, keys)} (model.arch = 'vit'); "
                    f"valid keys: {', '.join(keys)}"
                )
        shape = self.data.known_shape
        if shape is not None:  # a named set: the image geometry and the classes follow from it
            for key, value in zip(("image_size", "in_channels", "num_classes"), shape, strict=True):
                self.model.setdefault(key, value)
                if self.model[key] != value:
                    raise ValueError(
                        f"model.{key} = {self.model[key]!r} but data.dataset = {self.data.dataset!r} has "
                        f"{key} {value}; leave model.{key} out (it follows from the data)"
                    )
        if self.parallel.expert_parallel > 1:
            raise ValueError(
                "parallel.expert_parallel > 1 is supported for the language model only (model.arch = 'lm')"
            )
        self.vit_config()  # runs every ViTConfig / MoEConfig check now

    def moe_config(self) -> MoEConfig | SoftMoEConfig | None:
        if self.moe is None:
            return None
        values = dict(self.moe)
        defaults = ViTConfig if self.is_vit else LMConfig
        values.setdefault("d_model", self.model.get("d_model", defaults.d_model))
        values.setdefault("d_ff", self.model.get("d_ff", defaults.d_ff))
        values.setdefault("activation", self.model.get("activation", defaults.activation))
        if values.get("router") == "soft":
            if not self.is_vit:
                raise ValueError(
                    "moe.router = 'soft': Soft MoE mixes every token of a sequence into each slot, so a token would "
                    "see its future: it is refused in the causal TransformerLM (use it with model.arch = 'vit')"
                )
            # Soft MoE has its own config: slots instead of top-k and capacity (ALGORITHMS.md section 4).
            values.pop("router")
            for key in values:
                if key not in _SOFT_KEYS:
                    raise ValueError(
                        f"unknown config key 'moe.{key}' for moe.router = 'soft'{suggest(key, _SOFT_KEYS)}; "
                        f"valid keys: {', '.join(_SOFT_KEYS)}"
                    )
            return config_from_dict(SoftMoEConfig, values, "moe")
        return config_from_dict(MoEConfig, values, "moe")

    def lm_config(self, vocab_size: int) -> LMConfig:
        if self.is_vit:
            raise ValueError("this run is a ViT (model.arch = 'vit'), not a language model")
        model = dict(self.model)
        model.pop("arch", None)
        return config_from_dict(LMConfig, {**model, "vocab_size": vocab_size, "moe": self.moe_config()}, "model")

    def vit_config(self) -> ViTConfig:
        """The :class:`~moekit.models.vit.ViTConfig` of a ``model.arch = "vit"`` run."""
        if not self.is_vit:
            raise ValueError("this run is a language model (model.arch = 'lm'), not a ViT")
        model = dict(self.model)
        model.pop("arch", None)
        return config_from_dict(ViTConfig, {**model, "moe": self.moe_config()}, "model")

    def resolved(self) -> dict[str, dict[str, Any]]:
        """Every section with every default filled in (what ``config.toml`` in a run holds)."""
        if self.is_vit:
            lm = {"arch": "vit", **dataclasses.asdict(self.vit_config())}
        else:
            lm = dataclasses.asdict(self.lm_config(self.data.vocab_size))
            lm.pop("vocab_size")
        lm.pop("moe")
        out: dict[str, dict[str, Any]] = {"model": lm}
        moe = self.moe_config()
        if isinstance(moe, SoftMoEConfig):
            out["moe"] = {"router": "soft", **dataclasses.asdict(moe)}
        elif moe is not None:
            out["moe"] = dataclasses.asdict(moe)
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
    """Build a RunConfig from parsed TOML tables (strict keys)."""
    for key in tables:
        if key not in SECTIONS:
            raise ValueError(f"unknown config section [{key}]{suggest(key, SECTIONS)}; sections: {', '.join(SECTIONS)}")
    for key, value in tables.items():
        if not isinstance(value, dict):
            raise ValueError(f"[{key}] must be a table of key = value pairs, got {type(value).__name__}")
    tables = _none(tables)
    model = dict(tables.get("model", {}))
    moe = dict(tables["moe"]) if tables.get("moe") else None
    arch = model.get("arch", "lm")
    _check_arch(arch)  # checked first: it decides which keys [data] may hold
    data_cls = ImageDataConfig if arch == "vit" else DataConfig
    return RunConfig(
        model=model,
        moe=moe,
        data=config_from_dict(data_cls, tables.get("data", {}), "data"),
        train=config_from_dict(TrainConfig, tables.get("train", {}), "train"),
        parallel=config_from_dict(ParallelConfig, tables.get("parallel", {}), "parallel"),
    )


def parse_overrides(items: list[str]) -> dict[str, dict[str, Any]]:
    """``["train.max_steps=10", "data.corpus=sotu"]`` -> nested tables. Values are TOML (``10``, ``1e-3``,
    ``true``, ``"x"``); anything that does not parse as TOML is taken as a string."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects section.key=value, got {item!r}")
        path, raw = item.split("=", 1)
        if path.count(".") != 1:
            raise ValueError(f"--set expects section.key=value (one dot), got {path!r}")
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
            raise ValueError(f"--set: unknown section {section!r}{suggest(section, SECTIONS)}")
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
