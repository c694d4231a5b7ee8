#!/bin/sh
# Install moekit and its test tools into ./.venv (created if missing).
# torch: where no torch is importable we ask for torch==2.13.0, which on our CPU machines is the CPU build that
# lies on disk; an unpinned "torch" would pull a multi-GB CUDA build there. Users elsewhere only need torch>=2.6.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
if ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    .venv/bin/python -m pip install -q torch==2.13.0
fi
.venv/bin/python -m pip install -q -e ".[dev]"
