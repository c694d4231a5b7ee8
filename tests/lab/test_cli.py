"""The command line prints user errors as one line (exit 2) and lets bugs keep their traceback."""

from __future__ import annotations

import pytest

from moekit.errors import ConfigError, MoekitError
from moekit.lab import cli
from moekit.lab.commands import train as train_command


def test_config_error_is_one_line(capsys, tmp_path):
    assert cli.main(["train", "--set", "moe.top_kk=2", "--run-dir", str(tmp_path / "unused")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert err.startswith("moekit train: error: unknown config key 'moe.top_kk' (did you mean 'top_k'?)")


def test_config_errors_are_value_errors_and_user_errors():
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, MoekitError)
    assert ValueError not in cli.USER_ERRORS  # a plain ValueError is a bug's, not the user's


def test_an_internal_value_error_keeps_its_traceback(monkeypatch, tmp_path):
    def broken(args):
        raise ValueError("an internal invariant broke")

    monkeypatch.setattr(train_command, "run", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        cli.main(["train", "--run-dir", str(tmp_path / "unused")])


def test_version_prints_the_package_version_and_exits_0(capsys):
    import moekit
    from moekit.lab.cli import main as cli_main

    with pytest.raises(SystemExit) as info:
        cli_main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"moekit {moekit.__version__}"
