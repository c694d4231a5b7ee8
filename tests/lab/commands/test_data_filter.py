"""``moekit data filter``: every input document lands in exactly one output, reuse of a saved classifier,
reproducible Pareto selection, and one-line errors that leave no output behind."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from moekit.lab.cli import main

_WORDS = "the river city council harvest winter letter village crossed described admired quiet ancient".split()


def _clean(rng: random.Random) -> str:
    return (
        " ".join(
            f"The {rng.choice(_WORDS)} {rng.choice(_WORDS)} of the {rng.choice(_WORDS)} {rng.choice(_WORDS)}."
            for _ in range(rng.randint(3, 6))
        )
        + "\n"
    )


def _noisy(rng: random.Random) -> str:
    n = rng.randint(1000, 9999)
    return (
        f"Received: from mx{n}.example.net by smtp.example.com\nContent-Type: text/html\n\n"
        f"<html><FONT SIZE=3D2>CLICK HERE!!! ${n % 97}.00 FREE =20 http://x{n}.biz/?id=3D{n}</FONT></html>\n"
    )


def _write(root: Path, docs: dict[str, str]) -> Path:
    for name, text in docs.items():
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text, encoding="utf-8")
    return root


@pytest.fixture
def data(tmp_path: Path) -> Path:
    rng = random.Random(0)
    _write(tmp_path / "pos", {f"p{i:02d}.txt": _clean(rng) for i in range(30)})
    _write(tmp_path / "neg", {f"n{i:02d}.txt": _noisy(rng) for i in range(30)})
    corpus = {f"a/clean{i}.txt": _clean(rng) for i in range(8)}
    corpus |= {f"b/mail{i}.eml": _noisy(rng) for i in range(8)}
    corpus["blank.txt"] = "   \n"  # a blank document still goes to exactly one output
    _write(tmp_path / "corpus", corpus)
    return tmp_path


def _args(d: Path, out: str, *extra: str) -> list[str]:
    return [
        "data",
        "filter",
        "--positives",
        str(d / "pos"),
        "--negatives",
        str(d / "neg"),
        "--input",
        str(d / "corpus"),
        "--output",
        str(d / out),
        "--progress",
        "off",
        "--n-features",
        "4096",
        *extra,
    ]


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): p.read_text(encoding="utf-8") for p in root.rglob("*") if p.is_file()}


def test_filter_writes_every_document_to_exactly_one_output(data, capsys):
    assert main(_args(data, "out", "--threshold", "0.5")) == 0
    out = data / "out"
    corpus, kept, dropped = _tree(data / "corpus"), _tree(out / "kept"), _tree(out / "dropped")
    assert not set(kept) & set(dropped)
    assert kept | dropped == corpus  # same names, same contents
    # The hand-made fixture is easy: clean prose kept, mails dropped.
    assert {n for n in kept if n.startswith("a/")} == {f"a/clean{i}.txt" for i in range(8)}
    assert not any(n.startswith("b/") for n in kept)
    assert "blank.txt" in dropped  # blank: score 0
    scores = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert sorted(s["name"] for s in scores) == sorted(corpus)
    assert all((s["name"] in kept) == s["kept"] and 0 <= s["score"] <= 1 for s in scores)
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["documents"], summary["kept"] + summary["dropped"]) == (17, 17)
    assert summary["kept"] == len(kept) and summary["rule"] == {"threshold": 0.5}
    assert summary["classifier_metrics"]["auc"] == 1.0
    assert (out / "classifier" / "classifier.safetensors").is_file()
    assert "kept 8 of 17 documents" in capsys.readouterr().out
    assert sorted(p.name for p in data.iterdir()) == ["corpus", "neg", "out", "pos"]  # no temporary left


def test_saved_classifier_and_pareto_selection_are_reproducible(data, capsys):
    assert main(_args(data, "first", "--threshold", "0.5")) == 0
    clf = str(data / "first" / "classifier")
    base = ["data", "filter", "--classifier", clf, "--input", str(data / "corpus"), "--progress", "off"]
    assert main([*base, "--output", str(data / "p1"), "--pareto-alpha", "9", "--seed", "3"]) == 0
    assert main([*base, "--output", str(data / "p2"), "--pareto-alpha", "9", "--seed", "3"]) == 0
    assert _tree(data / "p1" / "kept") == _tree(data / "p2" / "kept")
    s1 = (data / "p1" / "scores.jsonl").read_text()
    # The loaded classifier scores exactly as the one that was trained.
    first = [json.loads(x)["score"] for x in (data / "first" / "scores.jsonl").read_text().splitlines()]
    again = [json.loads(x)["score"] for x in s1.splitlines()]
    assert first == again
    summary = json.loads((data / "p1" / "summary.json").read_text())
    assert summary["rule"]["pareto_alpha"] == 9.0 and summary["rule"]["seed"] == 3
    assert not (data / "p1" / "classifier").exists()


def test_jsonl_input(data, capsys):
    lines = [json.dumps({"text": t}) for t in ("The quiet river of the ancient city.", "CLICK HERE!!! FREE =20")]
    (data / "c.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    args = _args(data, "out", "--threshold", "0.5")
    args[args.index(str(data / "corpus"))] = str(data / "c.jsonl")
    assert main(args) == 0
    assert len(_tree(data / "out" / "kept")) + len(_tree(data / "out" / "dropped")) == 2


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: d / "missing", "does not exist"),
        (lambda d: (d / "empty").mkdir() or d / "empty", "is empty"),
        (lambda d: _write(d / "blank", {"x.txt": " \n\n"}), "is empty"),
        (lambda d: (d / "bin.txt").write_bytes(b"abc\x00\x01def") and d / "bin.txt", "binary"),
        (lambda d: (d / "latin.txt").write_bytes("café".encode("latin-1")) and d / "latin.txt", "UTF-8"),
        (lambda d: (d / "bad.jsonl").write_text("{not json\n") and d / "bad.jsonl", "not JSON"),
        (lambda d: (d / "nt.jsonl").write_text('{"body": "x"}\n') and d / "nt.jsonl", "'text'"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_output(data, capsys, setup, message):
    bad = setup(data)
    args = _args(data, "out", "--threshold", "0.5")
    args[args.index(str(data / "corpus"))] = str(bad)
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and err.startswith("moekit data: error:")
    assert not (data / "out").exists()
    assert not [p for p in data.iterdir() if p.name.startswith(".out")]


def test_bad_arguments(data, capsys):
    (data / "out").mkdir()
    assert main(_args(data, "out")) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["data", "filter", "--input", str(data / "corpus"), "--output", str(data / "o2")]) == 2
    assert "--positives and --negatives" in capsys.readouterr().err
    assert main(_args(data, "o3", "--pareto-alpha", "-1")) == 2
    assert "pareto_alpha" in capsys.readouterr().err
    assert (
        main(
            [
                "data",
                "filter",
                "--classifier",
                str(data / "pos"),
                "--input",
                str(data / "corpus"),
                "--output",
                str(data / "o4"),
            ]
        )
        == 2
    )
    assert "not a saved quality classifier" in capsys.readouterr().err
    args = _args(data, "o5")
    args[args.index("--n-features") + 1] = "0"
    assert main(args) == 2
    assert "n_features" in capsys.readouterr().err
    assert not any((data / o).exists() for o in ("o2", "o3", "o4", "o5"))
