"""The training-memory estimate of a run config (no model built) and the check that refuses a model too large for
the machine."""

from __future__ import annotations

from pathlib import Path

import pytest

from moekit.errors import MoekitError
from moekit.lab.training import size
from moekit.lab.training.run_config import load_run_config
from moekit.lab.training.size import (
    ACTIVATION_BYTES,
    LOGIT_BYTES,
    check_memory,
    estimate_training_memory,
    format_bytes,
    memory_problem,
)
from moekit.models import parameter_counts

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def test_estimate_follows_the_stated_formula():
    cfg = load_run_config(None)  # switch-tiny: AdamW, batch 16 x 128 tokens, D = 128, 4 layers, vocabulary 4096
    est = estimate_training_memory(cfg)
    params = parameter_counts(cfg.model)["total"]
    assert est.parameters == params == 3_148_928
    assert (est.weights, est.gradients, est.optimizer) == (4 * params, 4 * params, 8 * params)
    assert est.activations == ACTIVATION_BYTES * 16 * 128 * 128 * 4 + LOGIT_BYTES * 16 * 128 * 4096
    assert est.total == est.weights + est.gradients + est.optimizer + est.activations


def test_adafactor_state_is_factored():
    with_momentum = estimate_training_memory(load_run_config(None, ["train.optimizer='adafactor'"]))
    without = estimate_training_memory(load_run_config(None, ["train.optimizer='adafactor'", "train.beta1=0.0"]))
    p = with_momentum.parameters
    assert without.optimizer == 4 * 2 * p // 128  # a row and a column per matrix: at most 2P / d_model values
    assert with_momentum.optimizer == 4 * p + without.optimizer
    assert without.optimizer < estimate_training_memory(load_run_config(None)).optimizer / 50


@pytest.mark.parametrize("name", ["vit-softmoe", "switch-t5-tiny"])
def test_every_task_has_an_estimate(name):
    est = estimate_training_memory(load_run_config(CONFIGS / f"{name}.toml"))
    assert est.parameters > 0 and 0 < est.activations < est.total


@pytest.mark.parametrize(
    "overrides",
    [["model.d_model=100000"], ["moe.num_experts=2147483648"]],
    ids=["d_model=100000", "num_experts=2**31"],
)
def test_a_model_too_large_is_refused_with_the_estimate(overrides):
    cfg = load_run_config(None, overrides)  # a valid config: only the machine is too small
    est = estimate_training_memory(cfg)
    with pytest.raises(MoekitError) as info:
        check_memory(cfg, available=16 * 2**30)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"the model is too large for this machine: training needs about "
                               f"{format_bytes(est.total)} (")
    assert "but 16.0 GiB of memory is available" in message and "AdamW state" in message


def test_a_small_model_fits_and_unknown_memory_skips_the_check(monkeypatch):
    cfg = load_run_config(None)
    assert memory_problem(cfg, available=2**30) is None
    monkeypatch.setattr(size, "available_memory", lambda: None)
    check_memory(load_run_config(None, ["model.d_model=100000"]))  # nothing to compare with: no refusal


def test_check_uses_the_available_memory_of_the_machine(monkeypatch):
    cfg = load_run_config(None)
    monkeypatch.setattr(size, "available_memory", lambda: 100 * 2**20)  # 100 MiB: switch-tiny needs ~240 MiB
    with pytest.raises(MoekitError, match="but 100.0 MiB of memory is available"):
        check_memory(cfg)


def test_available_memory_reads_the_machine():
    available = size.available_memory()
    assert available is None or available > 0


def test_cgroup_limit_caps_the_available_memory(monkeypatch, tmp_path):
    files = {"memory.max": "1073741824\n", "memory.current": "268435456\n"}
    real = size._read_int

    def fake(path: Path) -> int | None:
        if path.parent == Path("/sys/fs/cgroup") and path.name in files:
            (tmp_path / path.name).write_text(files[path.name])
            return real(tmp_path / path.name)
        return None

    monkeypatch.setattr(size, "_read_int", fake)
    assert size._cgroup_room() == 3 * 2**28
    files["memory.max"] = "max\n"  # no limit
    assert size._cgroup_room() is None


@pytest.mark.parametrize(
    ("n", "text"), [(512, "512 B"), (1536, "1.5 KiB"), (3 * 2**30, "3.0 GiB"), (2**62, "4.0 EiB")]
)
def test_format_bytes(n, text):
    assert format_bytes(n) == text
