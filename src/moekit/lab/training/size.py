"""Will a run fit in this machine's memory? An estimate of what training a run config takes, made from the config
alone (the task's analytic parameter count: no model is built, no data read), and the check that refuses a model
too large for the machine with that estimate, before any data work and before torch's allocator fails with a
traceback (``model.d_model = 100000``, ``moe.num_experts = 2**31``).

The estimate, in bytes (training runs on the CPU, in the process's RAM):

- weights: ``4 P`` (float32; bf16 autocast keeps float32 weights), P the parameters of
  :meth:`~moekit.lab.training.tasks.Task.cost`;
- gradients: ``4 P``;
- optimizer state: AdamW ``8 P`` (two float32 moments); Adafactor ``4 P`` of momentum when ``train.beta1 > 0`` plus
  its factored second moments, a row and a column per matrix: at most ``2 P / d_model`` values, so
  ``4 * 2 P / d_model``;
- activations: ``ACTIVATION_BYTES * batch * tokens * d_model * layers`` for the blocks, plus
  ``LOGIT_BYTES * batch * positions * outputs`` for the output layer (logits, log-probabilities and their
  gradient). ``tokens * layers`` sums over the stacks of an encoder-decoder (inputs through the encoder, targets
  through the decoder); ``positions * outputs`` is ``seq_len * vocab_size`` for a language model, ``targets *
  vocab_size`` for an encoder-decoder, ``num_classes`` per image for a ViT.

``ACTIVATION_BYTES`` = 96 (24 float32 values per token, layer and model dimension): the tensors autograd keeps for
the backward pass measured 45 bytes for switch-tiny (D = 128, F = 4D, top-1, GELU), 67 with top-2 and 77 with SwiGLU
(``torch.autograd.graph.saved_tensors_hooks``, parameters excluded); the rest covers the backward pass's transient
buffers. The attention probabilities are not counted (``scaled_dot_product_attention`` does not keep them), nor the
data, the checkpoint copies or Python itself: the estimate is a floor to compare with the memory available, not a
prediction. Under expert parallelism on one machine the ranks share the experts but each holds its own copy of the
rest of the model: not counted either.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from moekit.errors import MoekitError

if TYPE_CHECKING:
    from moekit.lab.training.run_config import RunConfig

__all__ = [
    "ACTIVATION_BYTES",
    "LOGIT_BYTES",
    "MemoryEstimate",
    "available_memory",
    "check_memory",
    "estimate_training_memory",
    "format_bytes",
    "memory_problem",
]

ACTIVATION_BYTES = 96  # per token, layer and model dimension (see the module docstring)
LOGIT_BYTES = 12  # per logit: the logit, its log-probability and the gradient, float32 each
_FLOAT32 = 4


@dataclass(frozen=True)
class MemoryEstimate:
    """What training takes, in bytes, by part (the formulas are the module docstring's).

    Attributes:
        parameters: the model's parameters (all experts included).
        weights: float32 weights.
        gradients: float32 gradients.
        optimizer: the optimizer's state (``optimizer`` names it).
        activations: what the forward pass keeps for the backward pass, for one batch.
        optimizer_name: "adamw" or "adafactor".
    """

    parameters: int
    weights: int
    gradients: int
    optimizer: int
    activations: int
    optimizer_name: str

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations

    def breakdown(self) -> str:
        """``"1.2e+09 parameters: weights 4.5 GiB, gradients 4.5 GiB, AdamW state 8.9 GiB, activations 96 MiB"``."""
        name = {"adamw": "AdamW", "adafactor": "Adafactor"}.get(self.optimizer_name, self.optimizer_name)
        count = f"{self.parameters:,}" if self.parameters < 10**12 else f"{self.parameters:.3g}"
        return (
            f"{count} parameters: weights {format_bytes(self.weights)}, gradients {format_bytes(self.gradients)}, "
            f"{name} state {format_bytes(self.optimizer)}, activations {format_bytes(self.activations)}"
        )


def format_bytes(n: int | float) -> str:
    """``1536`` -> ``"1.5 KiB"`` (binary units up to EiB)."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} EiB"


def _activation_shape(config: RunConfig) -> tuple[int, int]:
    """``(sum over stacks of tokens * layers, logits)`` per batch row."""
    # The three model configs differ in how tokens and layers are laid out; a Task method would be the home of
    # this if more tasks come (the run driver does not branch on the architecture).
    from moekit.data.span_corruption import span_corruption_lengths
    from moekit.models.config import LMConfig
    from moekit.models.seq2seq_config import Seq2SeqConfig
    from moekit.models.vit import ViTConfig

    model, data = config.model, config.data
    if isinstance(model, LMConfig):
        return data.seq_len * model.n_layers, data.seq_len * data.vocab_size
    if isinstance(model, ViTConfig):
        return model.num_tokens * model.n_layers, model.num_classes
    if isinstance(model, Seq2SeqConfig):
        _, targets = span_corruption_lengths(data.seq_len, data.noise_density, data.mean_span_length)
        token_layers = data.seq_len * model.n_encoder_layers + targets * model.n_decoder_layers
        return token_layers, targets * data.vocab_size
    raise TypeError(f"no memory estimate for a {type(model).__name__}")


def estimate_training_memory(config: RunConfig) -> MemoryEstimate:
    """The memory training ``config`` takes, from the config alone (see the module docstring)."""
    params = config.task.cost(config.model, config).parameters
    train = config.train
    if train.optimizer == "adamw":
        optimizer = 2 * _FLOAT32 * params
    else:  # Adafactor: momentum when beta1 > 0, and a row and a column of second moments per matrix
        optimizer = (_FLOAT32 * params if train.beta1 > 0 else 0) + _FLOAT32 * 2 * params // config.model.d_model
    token_layers, logits = _activation_shape(config)
    batch = train.batch_size
    activations = ACTIVATION_BYTES * batch * token_layers * config.model.d_model + LOGIT_BYTES * batch * logits
    return MemoryEstimate(
        parameters=params,
        weights=_FLOAT32 * params,
        gradients=_FLOAT32 * params,
        optimizer=optimizer,
        activations=activations,
        optimizer_name=train.optimizer,
    )


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # cgroup v2 writes "max" for no limit


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup memory limit (a container's), None when there is no limit."""
    for limit_file, usage_file in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),  # cgroup v2
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),  # v1
    ):
        limit, usage = _read_int(Path(limit_file)), _read_int(Path(usage_file))
        # v1 writes a page-rounded 2**63 - 1 for no limit.
        if limit is not None and usage is not None and limit < 2**62:
            return max(0, limit - usage)
    return None


def available_memory() -> int | None:
    """Bytes a new allocation can still get: ``MemAvailable`` of ``/proc/meminfo`` (free memory plus the caches
    the kernel can drop), else ``os.sysconf``'s free pages; capped by a cgroup's memory limit. None when
    unknown (the memory check is then skipped)."""
    available: int | None = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024  # the kernel writes kB (KiB)
                break
    except (OSError, ValueError, IndexError):
        pass
    if available is None:
        try:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):  # not on this platform
            available = None
    room = _cgroup_room()
    if room is not None:
        available = room if available is None else min(available, room)
    return available


def memory_problem(config: RunConfig, available: int | None = None) -> str | None:
    """Why ``config`` cannot train in ``available`` bytes (default: :func:`available_memory`), or None when its
    estimate fits (or the available memory is unknown)."""
    if available is None:
        available = available_memory()
    if available is None:
        return None
    estimate = estimate_training_memory(config)
    if estimate.total <= available:
        return None
    return (
        f"the model is too large for this machine: training needs about {format_bytes(estimate.total)} "
        f"({estimate.breakdown()}; train.batch_size = {config.train.batch_size}) but {format_bytes(available)} of "
        "memory is available; make the model smaller (model.d_model, model.n_layers, moe.num_experts, moe.d_ff) "
        "or the batch (train.batch_size)"
    )


def check_memory(config: RunConfig, available: int | None = None) -> None:
    """Refuse (one :class:`~moekit.errors.MoekitError` line) a config whose training would not fit in memory; run it
    before any data work."""
    problem = memory_problem(config, available)
    if problem is not None:
        raise MoekitError(problem)
