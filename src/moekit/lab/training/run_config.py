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
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moekit.config import ConfigProblems, check_bool, check_int, check_positive_number, collect_config, suggest
from moekit.errors import ConfigError, MoekitError
from moekit.lab.data.config import DataConfig, ImageDataConfig
from moekit.lab.training.tasks import ARCHS, Task, moe_table, parse_moe, task_for_arch, task_of
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
    """The processes of a run form a ``data_parallel x expert_parallel`` mesh (``torchrun --nproc_per_node`` their
    product; see docs/TRAINING.md, "Expert and data parallelism").

    Attributes:
    data_parallel: replicas of each expert shard; every process takes ``1 / (data_parallel x expert_parallel)``
        of each global batch. 1: none.
    expert_parallel: processes the experts are spread over (must divide the number of experts). 1: every process
        holds every expert.
    timeout_s: how long a rank waits in a collective before giving up with an error (a peer died or hangs).
    fsdp: shard every weight except the experts (with its gradient and optimizer state) over all processes with
        FSDP2 instead of replicating it; needs more than one process and AdamW.
    """

    data_parallel: int = 1
    expert_parallel: int = 1
    timeout_s: float = 300.0
    fsdp: bool = False

    def __post_init__(self) -> None:
        check_int("parallel.data_parallel", self.data_parallel, 1)
        check_int("parallel.expert_parallel", self.expert_parallel, 1)
        check_positive_number("parallel.timeout_s", self.timeout_s)
        check_bool("parallel.fsdp", self.fsdp)

    @property
    def world(self) -> int:
        """The number of processes the layout needs."""
        return self.data_parallel * self.expert_parallel


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
        world = self.parallel.world
        if self.parallel.fsdp and world == 1:
            raise ConfigError(
                "parallel.fsdp = true shards weights over the processes of a run: it needs parallel.data_parallel x "
                "expert_parallel > 1 (launched with torchrun)"
            )
        if self.parallel.fsdp and self.train.optimizer != "adamw":
            raise ConfigError(
                f"parallel.fsdp = true needs train.optimizer = 'adamw', not {self.train.optimizer!r}: Adafactor "
                "factors each whole weight matrix, which FSDP splits over the processes"
            )
        if world > 1 and self.train.batch_size % world != 0:
            raise ConfigError(
                f"train.batch_size = {self.train.batch_size} (the global batch) must be a multiple of "
                f"parallel.data_parallel x expert_parallel = {world}: every rank takes an equal share"
            )

    def warnings(self) -> list[str]:
        """Settings that are valid but probably not meant, one line each (``moekit validate`` and ``moekit train``
        print them; nothing is refused)."""
        out = []
        t = self.train
        if t.warmup_steps >= t.max_steps:
            out.append(
                f"train.warmup_steps = {t.warmup_steps} >= train.max_steps = {t.max_steps}: the run ends during "
                f"warm-up, so the learning rate never reaches train.lr = {t.lr} and the {t.schedule} schedule never "
                "starts"
            )
        return out

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


# [moe] keys that default to the [model] value (parse_moe): a problem of one of them that the [moe] table does not
# set is the [model] value's, which the [model] check reports under its own name.
_INHERITED_MOE_KEYS = ("d_model", "d_ff", "activation")


class _Problems:
    """The problems of one config file, in order, each once; lines that mention a key whose value was refused
    (and replaced by its default to go on checking) are consequences of that default and are left out."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.replaced: set[str] = set()  # "section.key"

    def add(self, line: str) -> None:
        consequence = not line.startswith("unknown config") and any(
            re.search(rf"(?<![\w]){re.escape(key)}(?![\w])", line) for key in self.replaced
        )
        if not consequence and line not in self.lines:
            self.lines.append(line)

    def section(self, cls: type, values: Any, name: str) -> Any:
        config, lines, replaced = collect_config(cls, values, name)
        for line in lines:
            self.add(line)
        self.replaced |= {f"{name}.{key}" for key in replaced}
        return config


def _lines(exc: ConfigError) -> list[str]:
    return list(exc.problems) if isinstance(exc, ConfigProblems) else [str(exc)]


def _moe_lines(task: Task, model: dict[str, Any], moe: dict[str, Any], lines: list[str]) -> list[str]:
    """The problems of the ``[moe]`` section among ``lines``, without those of a ``[model]`` value it inherits
    (reported under the model's name). Such a value stops the ``[moe]`` check at once (``d_model`` is required
    there), so ``[moe]`` is checked again with the model's defaults standing in for the inherited keys."""
    inherited = tuple(f"moe.{k} " for k in _INHERITED_MOE_KEYS if k not in moe)
    if not any(line.startswith(inherited) for line in lines if inherited):
        return lines
    defaults = {k: getattr(task.model_config, k) for k in _INHERITED_MOE_KEYS if k not in moe}
    try:
        parse_moe(moe, {**model, **defaults}, task.model_config)
    except ConfigError as exc:
        return [line for line in _lines(exc) if not (inherited and line.startswith(inherited))]
    return []


def _parse_model(task: Task, model: dict[str, Any], moe: dict[str, Any] | None, data: Any, problems: _Problems) -> Any:
    """The task's typed ``[model]`` (with ``[moe]``), every problem of the two sections added to ``problems``; None
    when there was one. Unknown ``[model]`` keys are dropped one by one to reach the value checks; a broken
    ``[moe]`` (its own problems, or the task refusing it) is dropped to check ``[model]`` as a dense model."""
    model = dict(model)
    for _ in range(len(model) + 2):
        try:
            parsed = task.parse_model(model, moe, data)
        except ConfigError as exc:
            lines = _lines(exc)
        else:
            return None if problems.lines else parsed
        of_moe = [line for line in lines if line.startswith(("moe.", "unknown config key 'moe."))]
        if moe is not None and of_moe:
            lines = [line for line in lines if line not in of_moe] + _moe_lines(task, model, moe, of_moe)
        for line in lines:
            problems.add(line)
        unknown = [m.group(1) for m in map(_UNKNOWN_MODEL_KEY.match, lines) if m]
        if unknown:
            for key in unknown:
                model.pop(key, None)
        elif moe is not None and of_moe:
            moe = None
        else:
            return None
    return None


_UNKNOWN_MODEL_KEY = re.compile(r"unknown config key 'model\.(\w+)'")
_SECTION_OF_LINE = re.compile(r"(?:unknown config key '|\[)?(\w+)")


def _section_rank(line: str) -> int:
    """Where a problem line's section comes in :data:`SECTIONS` (lines of no section last)."""
    match = _SECTION_OF_LINE.match(line)
    name = match.group(1) if match else ""
    return SECTIONS.index(name) if name in SECTIONS else len(SECTIONS)


def build_run_config(tables: dict[str, Any]) -> RunConfig:
    """Parse TOML tables into a :class:`RunConfig` (strict keys): ``[data]``, ``[train]`` and ``[parallel]``
    first, then ``[model]`` and ``[moe]`` by the task of ``model.arch``.

    Every problem of the file is reported at once, in one :class:`~moekit.config.ConfigProblems` whose lines each
    name the key (``train.lr must be ...``, ``unknown config key 'moe.top_kk'``); the checks across sections
    (``data.seq_len <= model.max_seq_len``, expert parallelism) run once every section is valid."""
    problems = _Problems()
    known: dict[str, dict[str, Any]] = {}
    for key, value in tables.items():
        if key not in SECTIONS:
            problems.add(f"unknown config section [{key}]{suggest(key, SECTIONS)}; sections: {', '.join(SECTIONS)}")
        elif not isinstance(value, dict):
            problems.add(f"[{key}] must be a table of key = value pairs, got {type(value).__name__}")
        else:
            known[key] = value
    known = _none(known)
    model = dict(known.get("model", {}))
    moe: dict[str, Any] | None = None
    if "moe" in known:
        if known["moe"]:
            moe = dict(known["moe"])
        else:  # an empty table once meant a dense model, silently: say which of the two was meant
            problems.add("[moe] is empty: remove the section for a dense model, or set moe.num_experts")
    train = problems.section(TrainConfig, known.get("train", {}), "train")
    parallel = problems.section(ParallelConfig, known.get("parallel", {}), "parallel")
    try:
        task: Task | None = task_for_arch(model.get("arch", "lm"))  # it decides which keys [data] may hold
    except ConfigError as exc:
        problems.add(str(exc))
        task = None
    parsed_model = data = None
    if task is not None:
        data = problems.section(task.data_config, known.get("data", {}), "data")
        if data is not None:
            parsed_model = _parse_model(task, model, moe, data, problems)
    if problems.lines:
        raise ConfigProblems(sorted(problems.lines, key=_section_rank))  # in the order of a config file
    return RunConfig(model=parsed_model, data=data, train=train, parallel=parallel)


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


def layout_for_launch(
    run_config: RunConfig, world: int, *, data_parallel: int | None = None, expert_parallel: int | None = None
) -> ParallelConfig:
    """The ``[parallel]`` layout a resumed run takes on ``world`` processes (checkpoints reshard to any layout).

    Given both degrees: those. Given one: the other is ``world`` divided by it. Given none: the saved layout when
    it fits ``world``; else, for an MoE model, the saved ``data_parallel`` when the rest can hold the experts,
    then all processes on the experts, then all on data; a dense model is all data parallel. ``fsdp`` is kept,
    except on one process."""
    saved = run_config.parallel

    def split(given: int, name: str) -> int:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1 or world % given != 0:
            raise ConfigError(f"parallel.{name} = {given} does not divide the {world} processes of this launch")
        return world // given

    if data_parallel is not None and expert_parallel is not None:
        dp, ep = data_parallel, expert_parallel
    elif data_parallel is not None:
        dp, ep = data_parallel, split(data_parallel, "data_parallel")
    elif expert_parallel is not None:
        dp, ep = split(expert_parallel, "expert_parallel"), expert_parallel
    elif saved.world == world:
        dp, ep = saved.data_parallel, saved.expert_parallel
    else:
        moe = run_config.moe
        experts = moe.num_experts if moe is not None else 1
        if moe is not None and world % saved.data_parallel == 0 and experts % (world // saved.data_parallel) == 0:
            dp, ep = saved.data_parallel, world // saved.data_parallel
        elif moe is not None and experts % world == 0:
            dp, ep = 1, world
        else:
            dp, ep = world, 1
    # FSDP stays as it was, except on one process, where there is nothing to shard over.
    return dataclasses.replace(saved, data_parallel=dp, expert_parallel=ep, fsdp=saved.fsdp and dp * ep > 1)
