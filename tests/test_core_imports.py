"""Import hygiene of the reusable core: importing any module outside ``moekit.lab`` pulls in no plotting, tokenizer or
Hugging Face package and no lab module, and changes no process-wide setting (torch's thread count). Each check runs
in a fresh interpreter, since this test process has imported everything already."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import moekit

SRC = str(Path(moekit.__file__).resolve().parents[1])  # the moekit this test process imports
APPLICATION_ONLY = ("matplotlib", "tokenizers", "transformers", "moekit.lab")


def _run(code: str, *args: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, *filter(None, [os.environ.get("PYTHONPATH")])]))
    proc = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Lists the core modules without importing a package to look inside it (pkgutil.walk_packages would import
# moekit.lab to walk it), then imports them one by one, noting which one loads an application package or moves
# torch's thread count (set to an unusual 5 first).
_ALL_CORE = """
import importlib, json, os, pkgutil, sys
import torch
torch.set_num_threads(5)
import moekit

APPLICATION_ONLY = tuple(sys.argv[1:])

def walk(path, prefix):
    for info in pkgutil.iter_modules(path, prefix):
        if info.name in ("moekit.lab", "moekit.__main__"):
            continue
        yield info.name
        if info.ispkg:
            yield from walk([os.path.join(path[0], info.name.rsplit(".", 1)[1])], info.name + ".")

def application_modules():
    return {m for m in sys.modules if any(m == p or m.startswith(p + ".") for p in APPLICATION_ONLY)}

names = sorted(walk(moekit.__path__, "moekit."))
culprits, threads = {}, {}
for name in names:
    before = application_modules()
    importlib.import_module(name)
    new = sorted(application_modules() - before)
    if new:
        culprits[name] = new[:5]
    if torch.get_num_threads() != 5:
        threads[name] = torch.get_num_threads()
        torch.set_num_threads(5)
print(json.dumps({"modules": names, "culprits": culprits, "threads": threads}))
"""


def test_core_modules_import_no_application_package_and_keep_the_thread_count():
    out = _run(_ALL_CORE, *APPLICATION_ONLY)
    modules = out["modules"]
    # The walk found the core and nothing of the lab.
    for name in ("moekit.layers.moe", "moekit.training.trainer", "moekit.data.batches", "moekit.analysis.trace",
                 "moekit.distill.student", "moekit.adapters.inject"):
        assert name in modules
    assert not [m for m in modules if m.startswith("moekit.lab")]
    assert out["culprits"] == {}, f"core modules that import application packages: {out['culprits']}"
    assert out["threads"] == {}, f"core modules that change torch's thread count on import: {out['threads']}"


# What importing the package itself adds on top of its three dependencies (and what they import in turn).
_PACKAGE = """
import json, sys

def third_party():
    return {m.split(".")[0] for m in sys.modules} - set(sys.stdlib_module_names)

import numpy, safetensors, torch
allowed = third_party()
import moekit
from moekit import MoE, SoftMoE
print(json.dumps({"new": sorted(third_party() - allowed - {"moekit"}), "allowed": sorted(allowed)}))
"""


def test_importing_moekit_needs_only_torch_numpy_and_safetensors():
    out = _run(_PACKAGE)
    assert {"torch", "numpy", "safetensors"} <= set(out["allowed"])
    assert out["new"] == [], f"import moekit pulled in the third-party packages {out['new']}"
