"""Fixtures of the lab tests. ``script``: the ``benchmarks/repro`` script that a test module names in its ``SCRIPT``
constant, loaded as a module once per test module, with the scripts' folder first on ``sys.path`` (where the shared
``_report`` and ``_runs`` it imports live)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPRO = Path(__file__).resolve().parents[2] / "benchmarks" / "repro"


@pytest.fixture(scope="module")
def script(request: pytest.FixtureRequest) -> ModuleType:
    name = request.module.SCRIPT
    if str(REPRO) not in sys.path:
        sys.path.insert(0, str(REPRO))
    spec = importlib.util.spec_from_file_location(name, REPRO / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
