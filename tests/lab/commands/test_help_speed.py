"""``moekit --help`` (and every ``moekit COMMAND --help``) builds the parser without importing torch: the commands
import what they need when they run, and ``import moekit`` loads its layers on first use."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import moekit
from moekit.lab.commands import distill
from moekit.lab.distill.run import STUDENT_INITS

SRC = str(Path(moekit.__file__).resolve().parents[1])


def test_building_the_parser_imports_no_torch():
    code = ("import json, sys; from moekit.lab.cli import build_parser; build_parser(); "
            "print(json.dumps(sorted(m for m in ('torch', 'numpy', 'matplotlib', 'tokenizers') if m in sys.modules)))")
    env = dict(os.environ, PYTHONPATH=SRC)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "torch" not in json.loads(out.stdout.strip().splitlines()[-1])


def test_distill_init_choices_match_the_library():
    assert distill.INIT_METHODS == STUDENT_INITS


def test_layers_load_on_first_use():
    from moekit import MoE
    from moekit.layers import MoE as layers_moe

    assert MoE is layers_moe and moekit.SoftMoEConfig.__name__ == "SoftMoEConfig"
    try:
        moekit.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert str(exc) == "module 'moekit' has no attribute 'NoSuchThing'"
    else:
        raise AssertionError("moekit.NoSuchThing resolved")
