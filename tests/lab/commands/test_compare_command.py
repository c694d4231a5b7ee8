"""``moekit compare`` on the command line: it prints the table and the files it wrote, and a bad plan is one line
with exit status 2 before anything trains."""

from __future__ import annotations

from pathlib import Path

from tiny_lm import tiny_config_text

from moekit.lab.cli import main


def test_compare_command_prints_the_table_and_refuses_mismatched_data(tmp_path, tiny_corpus, capsys):
    moe = tmp_path / "moe.toml"
    moe.write_text(tiny_config_text(tiny_corpus, max_steps=4, eval_every=2, checkpoint_every=2))
    dense = tmp_path / "dense.toml"
    dense.write_text(moe.read_text().split("[moe]")[0] + "[data]" + moe.read_text().split("[data]")[1])
    out = tmp_path / "out"
    assert main(["compare", str(dense), str(moe), "--out", str(out), "--set", "train.threads=1"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| config | seeds | final val loss")
    assert "trained 2 run(s), skipped 0 finished earlier" in printed
    for name in ("compare.csv", "compare.md", "compare.json", "val_loss.png"):
        assert f"wrote {out / name}" in printed and (out / name).is_file()
    assert {p.name for p in out.iterdir()} >= {"dense", "moe"}
    assert (out / "dense" / "seed0" / "summary.json").is_file()
    # the same --out again: nothing to train
    assert main(["compare", str(dense), str(moe), "--out", str(out)]) == 0
    assert "trained 0 run(s), skipped 2 finished earlier" in capsys.readouterr().out

    other = tmp_path / "other.toml"
    other.write_text(moe.read_text().replace("vocab_size = 300", "vocab_size = 400"))
    assert main(["compare", str(dense), str(other), "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        "moekit compare: error: configs differ in data.vocab_size: dense has 300, other has 400; a comparison "
        "needs the same data, token budget and evaluation (use --set to align them)"
    )
    assert not (tmp_path / "o2").exists()
    assert main(["compare", str(Path(dense)), "--seeds", "0"]) == 2
    assert "--seeds must be an integer >= 1" in capsys.readouterr().err
