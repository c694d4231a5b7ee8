"""``moekit.lab.load_run`` / ``train``: loaded lazily by ``moekit.lab``; bad input is one line. (The working path
runs in docs/API.md, tests/test_api_docs.py.)"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import moekit
import moekit.lab
from moekit.errors import MoekitError

SRC = str(Path(moekit.__file__).resolve().parents[1])


def test_moekit_lab_imports_the_api_on_first_use():
    code = ("import json, sys; import moekit.lab; before = 'moekit.lab.api' in sys.modules; moekit.lab.load_run; "
            "print(json.dumps([before, 'moekit.lab.api' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=SRC))
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [False, True]
    with pytest.raises(AttributeError, match=r"^module 'moekit.lab' has no attribute 'nothing'$"):
        moekit.lab.nothing  # noqa: B018


def test_load_run_errors_are_one_line(tmp_path):
    with pytest.raises(MoekitError, match=r"does not exist$"):
        moekit.lab.load_run(tmp_path / "missing")
    with pytest.raises(MoekitError, match=r"^override train.lr: give a number, a boolean or a string, got list$"):
        moekit.lab.train("switch-tiny", tmp_path / "run", {"train.lr": [1]})
