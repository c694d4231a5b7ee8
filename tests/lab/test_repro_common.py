"""benchmarks/repro/_report.py and _runs.py: the verdict rules every study uses, its output files, and the shared
``main`` (arguments, --section)."""

import argparse
import csv
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks" / "repro"))

import _report  # noqa: E402
import _runs  # noqa: E402


def test_verdict_reads_the_interval_against_the_papers_side():
    assert _report.verdict(-0.3, 0.1, -1) == "reproduced"  # [-0.4, -0.2]: below zero, the paper's side
    assert _report.verdict(-0.3, 0.1, +1) == "contradicted"
    assert _report.verdict(0.3, 0.1, +1) == "reproduced"
    assert _report.verdict(0.05, 0.1, -1) == "not resolved at this scale"  # [-0.05, 0.15] holds 0
    assert _report.verdict(-0.3, float("nan"), -1) == "not resolved at this scale"  # one seed: no interval
    with pytest.raises(ValueError):
        _report.verdict(0.0, 0.1, 0)


def test_count_verdict_needs_significance_and_a_difference():
    assert _report.count_verdict(0.007, -6, -1) == "reproduced"  # fewer, as the paper expects
    assert _report.count_verdict(0.007, -6, +1) == "contradicted"
    assert _report.count_verdict(0.2, -2, -1) == "not resolved at this scale"


def test_write_outputs_and_section_links(tmp_path):
    out = tmp_path / "docs" / "results" / "x"
    rows = [{"arm": "a", "seed": 0, "loss": 1.5}, {"arm": "b", "seed": 0, "loss": 2.5, "extra": 1}]
    _report.write_outputs(out, {"rows": rows, "path": Path("p")}, {"m": 1.0}, "## X\n\n![p](loss.png) ![q](a.png)\n",
                          rows)
    data = json.loads((out / "results.json").read_text())
    assert data["stats"] == {"m": 1.0} and data["result"]["path"] == "p"  # a Path is written as its text
    with open(out / "runs.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["loss"] for r in table] == ["1.5", "2.5"] and "extra" not in table[1]  # the first row's columns
    results_md = tmp_path / "docs" / "RESULTS.md"
    assert _report.section_text(out, results_md) == "## X\n\n![p](results/x/loss.png) ![q](results/x/a.png)\n"
    assert _report.section_text(out, results_md, "loss.png") == "## X\n\n![p](results/x/loss.png) ![q](a.png)\n"


def test_study_main_runs_or_writes_the_section(tmp_path):
    parser = _runs.study_parser("A study.\n\nMore.", "runs/x", seeds=3, steps=10)
    seen = {}

    def study(args):
        seen["args"] = args
        return {"n": args.seeds}

    def write(result, args):
        _report.write_outputs(Path(args.out), result, {}, f"## Study\n\nn = {result['n']}\n")

    def prepare(args, _parser):
        args.total = args.seeds * args.steps

    out = tmp_path / "out"
    argv = ["--out", str(out), "--seeds", "4", "--runs", str(tmp_path / "runs")]
    assert _runs.study_main(parser, argv, "## Study", study, write, prepare) == 0
    args = seen["args"]
    assert (args.seeds, args.steps, args.total, args.corpus) == (4, 10, 40, "mixed")
    assert args.command == " ".join(argv) and (tmp_path / "runs" / ".study.lock").is_file()
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# R\n\n## Study\n\nold\n\n## Other\n\nkept\n")
    assert _runs.study_main(parser, ["--out", str(out), "--section", str(results_md)], "## Study", study, write) == 0
    assert results_md.read_text() == "# R\n\n## Study\n\nn = 4\n\n## Other\n\nkept\n"
    (out / "notes.md").write_text("A hand-written reading.\n")  # kept below the generated text on every rerun
    assert _runs.study_main(parser, ["--out", str(out), "--section", str(results_md)], "## Study", study, write) == 0
    assert results_md.read_text() == "# R\n\n## Study\n\nn = 4\n\nA hand-written reading.\n\n## Other\n\nkept\n"
    assert isinstance(parser, argparse.ArgumentParser)


def test_a_second_study_on_the_same_runs_folder_stops(tmp_path):
    # The first study holds the lock; a second one (another process: flock locks belong to open files, so a second
    # open in this process conflicts the same way) stops with one line naming the holder; after the first, it runs.
    runs = tmp_path / "runs"
    with _runs.study_lock(runs):
        with pytest.raises(SystemExit, match=r"runs is in use by process \d+; wait for it or give another --runs"):
            with _runs.study_lock(runs):
                pass
    with _runs.study_lock(runs):
        assert (runs / ".study.lock").read_text().startswith("process ")


def test_the_shared_data_is_prepared_once_and_every_run_trains_on_it(tmp_path, tiny_corpus):
    from safetensors.numpy import load_file
    from tiny_lm import tiny_config_text

    from moekit.lab.training.tasks import TOKENIZER_FILE, TOKENS_FILE

    config = tmp_path / "tiny.toml"
    config.write_text(tiny_config_text(tiny_corpus, max_steps=2, eval_every=2, checkpoint_every=2))
    runs = tmp_path / "runs"
    data = _runs.prepare_shared_data(runs, str(config), [])
    assert data == runs / "data" and (data / TOKENIZER_FILE).is_file()
    before = (data / TOKENS_FILE).read_bytes()
    assert _runs.prepare_shared_data(runs, str(config), []) == data  # reused: the same file, not rebuilt
    assert (data / TOKENS_FILE).read_bytes() == before
    jobs = [(str(runs / f"seed{s}"), str(config), [f"train.seed={s}", "train.progress='off'"]) for s in range(2)]
    done = _runs.run_all(jobs, data, 2)
    shared = load_file(str(data / TOKENS_FILE))
    for r in done:
        assert r["summary"]["steps"] == 2
        own = load_file(str(Path(r["run_dir"]) / TOKENS_FILE))
        assert all((own[k] == shared[k]).all() for k in ("train", "val"))
        assert (Path(r["run_dir"]) / TOKENIZER_FILE).read_bytes() == (data / TOKENIZER_FILE).read_bytes()
