"""Flat resident memory: the command line tunes glibc's malloc and starts the heap trimmer for the commands that
train (not for bench, whose timed loops a trim would disturb); the trimmer is one daemon thread. The automatic
thread choice says why it takes fewer threads than cores. (Tokens/s and max RSS: benchmarks/train_tune_malloc.py.)"""

from __future__ import annotations

import importlib
import sys
import threading

import pytest
import torch

from moekit.lab import cli, runtime


@pytest.fixture
def calls(monkeypatch) -> list[str]:
    seen: list[str] = []
    monkeypatch.setattr(cli, "tune_malloc", lambda: seen.append("tune") or True)
    monkeypatch.setattr(cli, "trim_heap_every", lambda: seen.append("trim") or True)
    return seen


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["train"], ["tune", "trim"]),
        (["train", "--no-tune-malloc"], []),
        (["compare", "a.toml"], ["tune", "trim"]),
        (["bench"], ["tune"]),
        (["validate", "a.toml"], []),
    ],
)
def test_the_command_line_starts_the_trimmer_for_training_commands(argv, expected, calls, monkeypatch):
    # The command itself does nothing here: only the settings main applies before it are looked at.
    monkeypatch.setattr(importlib.import_module(f"moekit.lab.commands.{argv[0]}"), "run", lambda args: 0)
    assert cli.main(argv) == 0
    assert calls == expected


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc_trim is glibc's (Linux)")
def test_trimmer_is_one_daemon_thread_and_stops(monkeypatch):
    monkeypatch.setattr(runtime, "_trimmer", None)
    with pytest.raises(ValueError, match=r"^interval_s must be > 0, got 0$"):
        runtime.trim_heap_every(0)
    assert runtime.trim_heap_every(0.01) is True
    thread = runtime._trimmer
    assert runtime.trim_heap_every(0.01) is True and runtime._trimmer is thread  # once per process
    assert thread in threading.enumerate() and thread.daemon and thread.name == "moekit-malloc-trim"
    runtime.stop_heap_trimmer()
    assert not thread.is_alive() and runtime._trimmer is None


def test_automatic_threads_say_why_they_are_fewer_than_cores(monkeypatch):
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(runtime.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    monkeypatch.setattr("moekit.training.trainer.os.cpu_count", lambda: 4)
    monkeypatch.setattr("moekit.training.trainer.os.getloadavg", lambda: (1.2, 0.0, 0.0))
    torch.set_num_threads(4)  # torch's default on 4 cores (conftest restores the count)
    lines: list[str] = []
    assert runtime.set_threads(0, lines.append) == 3
    assert lines == [
        "threads: 3 of 4 cores (train.threads = 0, automatic: the 1-minute load average is 1.2, so other processes "
        "hold the rest; threads waiting on busy cores run slower than fewer threads); --set train.threads=N chooses"
    ]
    lines.clear()
    assert runtime.set_threads(2, lines.append) == 2 and lines == []  # chosen, not automatic: nothing to explain
