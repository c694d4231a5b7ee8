"""docs/API.md runs: every ```python block of the page, in order, as one script in an empty folder. A ``print`` whose
line ends with ``# -> TEXT`` (or is followed by a line ``# -> TEXT``) must print exactly TEXT, where ``...`` stands
for any text and a note after two spaces in parentheses is not part of it."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

API_MD = Path(__file__).resolve().parents[1] / "docs" / "API.md"
_EXPECT = re.compile(r"^(?P<code>.*?)\s*# -> (?P<text>.*?)(?:  \(.*\))?$")


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def instrument(code: str) -> tuple[str, int]:
    """``code`` with each marked ``print(...)`` turned into ``_expect(TEXT, ...)``; and how many there are."""
    lines = code.splitlines()
    out: list[str] = []
    count = 0
    for line in lines:
        m = _EXPECT.match(line)
        if m is None:
            out.append(line)
            continue
        code_part, text = m["code"], m["text"]
        if not code_part.strip():  # "# -> TEXT" on its own line: for the print just above
            prev = out.pop()
            code_part = prev
        indent, call = re.match(r"^(\s*)(.*)$", code_part).groups()
        assert call.startswith("print(") and call.endswith(")"), f"'# ->' must follow a one-line print: {line!r}"
        out.append(f"{indent}_expect({text!r}, {call[len('print('):]}")
        count += 1
    return "\n".join(out) + "\n", count


def _expect(expected: str, *values: object) -> None:
    got = " ".join(str(v) for v in values)
    print(got)
    pattern = "^" + ".*".join(re.escape(part) for part in expected.split("...")) + "$"
    assert re.match(pattern, got, flags=re.S), f"docs/API.md: expected {expected!r}, printed {got!r}"


def test_instrument_marks_prints() -> None:
    code, n = instrument('print(1 + 1)   # -> 2  (a note)\nx = 3\nprint(x)\n# -> 3\n')
    assert (code, n) == ("_expect('2', 1 + 1)\nx = 3\n_expect('3', x)\n", 2)
    with pytest.raises(AssertionError, match="printed '2'"):
        _expect("3", 2)
    _expect("MoEAux(a=..., b=2)", "MoEAux(a=0.5, c=1, b=2)")


def test_api_md_snippets_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = python_blocks(API_MD.read_text(encoding="utf-8"))
    assert len(blocks) == 8
    code, checks = instrument("\n".join(blocks))
    assert checks >= 30
    monkeypatch.chdir(tmp_path)
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        exec(compile(code, str(API_MD), "exec"), {"__name__": "api_md", "_expect": _expect})
    printed = buffer.getvalue().splitlines()
    # print(aux) of a 16-expert Soft MoE layer is one line, not hundreds
    soft = [line for line in printed if "SoftRoutingDecision" in line]
    assert len(soft) == 1 and len(soft[0]) < 300
    assert (tmp_path / "tiny-run" / "summary.json").is_file() and (tmp_path / "lora-adapters").is_dir()
