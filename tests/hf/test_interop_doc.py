"""The Python block of docs/INTEROP.md runs as written, on a tiny random Qwen3-MoE in a temporary directory."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers")
from tests.hf._tiny import tiny_hf_model  # noqa: E402

DOC = Path(__file__).resolve().parents[2] / "docs" / "INTEROP.md"


def test_python_block_runs(tmp_path, capsys):
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 1
    tiny_hf_model("qwen3_moe").save_pretrained(tmp_path / "qwen3-moe-tiny")
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        exec(compile(blocks[0], str(DOC), "exec"), {})
    finally:
        os.chdir(cwd)
    printed = capsys.readouterr().out
    assert printed.startswith("tensor([ 5, 17, 42,  8,")  # the prompt and 8 generated ids
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "qwen3-moe-tuned")
    assert type(back).__name__ == "Qwen3MoeForCausalLM"
