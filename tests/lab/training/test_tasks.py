"""The task registry: one task per ``model.arch``, each implementing the whole :class:`Task` protocol, found from a
typed model config; commands a task does not support are refused in one line."""

from __future__ import annotations

from pathlib import Path

import pytest

from moekit.errors import MoekitError
from moekit.lab.training.run_config import load_run_config
from moekit.lab.training.tasks import ARCHS, RUN_COMMANDS, TASKS, Task, task_for_arch, task_of

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
PROTOCOL = [name for name in vars(Task) if not name.startswith("_")] + list(Task.__annotations__)


def test_registry_maps_each_arch_to_a_complete_task():
    assert ARCHS == ("lm", "vit", "seq2seq")
    for arch, task in TASKS.items():
        assert task.arch == arch and task_for_arch(arch) is task
        missing = [name for name in PROTOCOL if not hasattr(task, name)]
        assert not missing, (arch, missing)
        assert "eval" in task.commands and set(task.commands) <= set(RUN_COMMANDS)
    with pytest.raises(ValueError, match=r"model.arch must be one of \('lm', 'vit', 'seq2seq'\), got 'vitt' \(did"):
        task_for_arch("vitt")


@pytest.mark.parametrize("name, arch", [("switch-tiny", "lm"), ("dense-tiny", "lm"), ("vit-ec", "vit"),
                                        ("switch-t5-tiny", "seq2seq")])
def test_a_config_knows_its_task(name, arch):
    cfg = load_run_config(CONFIGS / f"{name}.toml")
    assert cfg.task is TASKS[arch] and task_of(cfg.model) is TASKS[arch] and cfg.arch == arch
    assert isinstance(cfg.data, cfg.task.data_config)
    kind, lines = cfg.task.describe(cfg)
    assert kind and len(lines) == 2


def test_unsupported_commands_are_refused_in_one_line(tmp_path):
    lm, vit = TASKS["lm"], TASKS["vit"]
    for command in RUN_COMMANDS:
        lm.require(command, tmp_path)
    vit.require("eval", tmp_path)
    for command in ("generate", "analyze", "distill"):
        with pytest.raises(MoekitError) as err:
            vit.require(command, tmp_path)
        message = str(err.value)
        assert "\n" not in message
        assert message == (
            f"{tmp_path} is an image classifier (model.arch = 'vit') run; moekit {command} works on "
            "language-model and encoder-decoder runs"
        )


def test_a_command_no_task_knows_is_a_bug_not_a_user_error(tmp_path):
    """Only code can ask for a command outside RUN_COMMANDS: a ValueError (traceback), not a one-line refusal with
    an empty list of the runs it works on."""
    with pytest.raises(ValueError, match="no task supports the command 'distillation study'"):
        TASKS["lm"].require("distillation study", tmp_path)
