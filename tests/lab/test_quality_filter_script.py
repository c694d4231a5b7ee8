"""benchmarks/repro/quality_filter.py: the data's roles never overlap, the arms' corpora are what the study says,
paired differences and verdicts on made-up results, and the whole study end to end on tiny made-up sources (the
real study takes about 40 minutes)."""

import json
from pathlib import Path

import numpy as np
import pytest

SCRIPT = "quality_filter"  # benchmarks/repro/quality_filter.py, loaded by the script fixture (conftest.py)


def _sources() -> tuple[dict[str, list[str]], list[str]]:
    """Curated documents of plain sentences (four sources, 12 documents each) and 800 mail bodies of sales talk."""
    rng = np.random.default_rng(0)
    prose = "the river ran past the old mill and the children watched the boats go down to the sea".split()
    sales = "click here now to win free money limited offer act today unsubscribe deal cheap".split()

    def text(words: list[str], n: int) -> str:
        lines = [" ".join(rng.choice(words, 12)).capitalize() + "." for _ in range(n)]
        return "\n".join(lines)

    curated = {name: [text(prose, 60) for _ in range(12)] for name in ("brown", "sotu", "moby", "shakespeare")}
    return curated, [text(sales, 4) for _ in range(800)]


def _args(script, tmp_path: Path, *extra: str):
    args = script.parser().parse_args(["--out", str(tmp_path / "out"), "--runs", str(tmp_path / "runs"),
                                       "--curated-chars", "6000", "--heldout-chars", "2000", *extra])
    args.command = " ".join(extra)
    return args


def test_no_document_has_two_roles_and_the_mixed_corpus_is_half_mail(script, tmp_path):
    args = _args(script, tmp_path)
    data = tmp_path / "data"
    manifest = script.build_data(args, data, _sources())
    mixed = script._read_docs(data / "mixed")
    held = {p.name: [n for n, _ in script._read_docs(p)] for p in (data / "heldout").iterdir()}
    # Pieces are named source-document-piece; held-out documents source-document: the documents never overlap.
    mixed_docs = {n.rsplit("-", 1)[0] if script.source_of(n) != "mail" else n for n, _ in mixed}
    for name, docs in held.items():
        assert not set(docs) & mixed_docs, name
    assert set(held) == {"brown", "sotu", "moby", "shakespeare", "mail"}
    assert all(sum(len(t) for _, t in script._read_docs(data / "heldout" / n)) <= 2000 for n in held)
    makeup = script.corpus_makeup(data / "mixed")
    # Each curated source gives its 6,000 characters (the piece that crosses the line included), mail as many.
    curated = sum(v for k, v in makeup.items() if k != "mail")
    assert all(6000 <= makeup[s] < 6000 + 3000 for s in ("brown", "sotu", "moby", "shakespeare"))
    assert curated <= makeup["mail"] < curated + 400
    assert manifest["mixed"]["curated_chars"] == curated
    # Made-up prose against made-up sales talk: the classifier separates them on documents it never saw.
    assert manifest["auc_mixed"] == pytest.approx(1.0)
    assert json.loads((data / "manifest.json").read_text())["flags"]["curated_chars"] == 6000
    assert not (tmp_path / "data.partial").exists()


def test_the_filtered_and_random_corpora_follow_the_rule_and_the_seed(script, tmp_path):
    from moekit.lab.data.quality import keep_mask

    args = _args(script, tmp_path)
    data = tmp_path / "data"
    manifest = script.build_data(args, data, _sources())
    corpora = script.arm_corpora(data, manifest, 2)
    mixed = script._read_docs(data / "mixed")
    for s in range(2):
        keep = keep_mask(np.array([manifest["scores"][n] for n, _ in mixed]), pareto_alpha=9.0, seed=s)
        assert [n for n, _ in script._read_docs(corpora["filtered", s])] == \
            sorted(n for (n, _), k in zip(mixed, keep, strict=True) if k)
        kept = sum(len(t) for _, t in script._read_docs(corpora["filtered", s]))
        random_docs = script._read_docs(corpora["random", s])
        chars = sum(len(t) for _, t in random_docs)
        # As many characters as the filter kept: the last document taken crosses the line.
        assert chars >= kept and chars - max(len(t) for _, t in random_docs) < kept
    assert script.corpus_makeup(corpora["filtered", 0]).get("mail", 0) < 500  # sales talk scores near 0
    assert corpora["mixed", 1] == data / "mixed"


def test_paired_differences_and_verdicts(script):
    # Seed s shifts every arm by s / 10; on the unseen text filtered is 0.05 below mixed in every seed and equal to
    # random up to -0.01, +0.01, 0; paired, the seed shift cancels.
    rows = []
    for s in range(3):
        for arm, base in (("mixed", 2.0), ("filtered", 1.95), ("random", 1.95)):
            row = {"arm": arm, "seed": s, "epochs": 1.0, "corpus_chars": 100, "corpus_mail_chars": 10}
            for h in script.HELDOUT_SETS:
                row[f"{h}_bits_per_byte"] = base + s / 10 + (((-0.01, 0.01, 0.0)[s]) if arm == "random" else 0.0)
            rows.append(row)
    stats = script.analyse({"rows": rows})
    mixed, random = stats["claims"]
    assert (mixed["a"], mixed["b"], mixed["set"]) == ("filtered", "mixed", "unseen")
    assert mixed["mean"] == pytest.approx(-0.05) and mixed["half"] == pytest.approx(0.0, abs=1e-9)
    assert mixed["verdict"] == "reproduced"
    # Differences +0.01, -0.01, 0: mean 0, sd 0.01, half 4.303 x 0.01 / sqrt(3) = 0.02484.
    assert random["mean"] == pytest.approx(0.0, abs=1e-12) and random["half"] == pytest.approx(4.303 * 0.01 / 3**0.5)
    assert random["verdict"] == "not resolved at this scale"
    assert stats["seed_sd"]["mixed/unseen"] == pytest.approx(0.1)
    assert stats["mail_share"]["mixed"] == pytest.approx(0.1)


def test_the_study_end_to_end_on_tiny_sources(script, tmp_path, monkeypatch):
    monkeypatch.setattr(script, "load_sources", _sources)
    out = tmp_path / "out"
    argv = ["--out", str(out), "--runs", str(tmp_path / "runs"), "--curated-chars", "20000", "--heldout-chars",
            "2000", "--seeds", "2", "--steps", "2", "--jobs", "2"]
    assert script.main(argv) == 0
    result = json.loads((out / "results.json").read_text())
    rows = result["result"]["rows"]
    assert len(rows) == 6 and {r["steps"] for r in rows} == {2}
    # One tokenizer for every run: the held-out text has the same number of tokens whatever the arm.
    assert len({r["unseen_tokens"] for r in rows}) == 1
    assert all(0 < r["unseen_bits_per_byte"] < 20 for r in rows)
    text = (out / "results.md").read_text()
    assert "| filtered - mixed |" in text and (out / "heldout.png").is_file()
    results_md = tmp_path / "RESULTS.md"
    assert script.main([*argv, "--section", str(results_md)]) == 0
    assert results_md.read_text().startswith(script.HEADING)
