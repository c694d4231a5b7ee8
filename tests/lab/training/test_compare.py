"""``moekit.lab.training.compare``: the table's numbers are the per-run summaries' (means and spreads computed here by
hand), the plot is a PNG, a rerun trains nothing, a half-finished run resumes, mismatched data is refused, and the
speedup arithmetic matches golden numbers on synthetic metrics."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest
from tiny_lm import tiny_config_text, write_tiny_corpus

from moekit.errors import MoekitError
from moekit.lab.training.compare import CSV_COLUMNS, compare, run_curve, steps_to_target
from moekit.lab.training.run import train_run
from moekit.lab.training.run_config import load_run_config, to_toml
from moekit.training.metrics import read_metrics

MOE_SECTION = """[moe]
num_experts = 4
top_k = 1
capacity_factor = 1.25
jitter_eps = 0.01
"""


def _write_configs(folder: Path, corpus: Path, **train: object) -> tuple[Path, Path]:
    moe_text = tiny_config_text(corpus, **train)
    assert MOE_SECTION in moe_text
    dense, moe = folder / "dense.toml", folder / "moe.toml"
    dense.write_text(moe_text.replace(MOE_SECTION, ""))
    moe.write_text(moe_text)
    return dense, moe


def _fail(*args, **kwargs):
    raise AssertionError("a finished comparison must not train again")


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """dense + MoE, 2 seeds each, 6 steps with an evaluation every 2 (4 runs, a few seconds)."""
    tmp = tmp_path_factory.mktemp("compare")
    corpus = write_tiny_corpus(tmp / "corpus.txt")
    dense, moe = _write_configs(tmp, corpus, max_steps=6, eval_every=2, checkpoint_every=3)
    out = tmp / "out"
    result = compare([str(dense), str(moe)], seeds=2, out_dir=out, log=lambda m: None)
    return result, dense, moe


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _summary(out: Path, name: str, seed: int) -> dict:
    return json.loads((out / name / f"seed{seed}" / "summary.json").read_text())


def test_table_numbers_are_the_per_run_summaries(compared):
    result, _, _ = compared
    out = result.out_dir
    assert len(result.trained) == 4 and result.skipped == []
    with open(out / "compare.csv", newline="") as f:
        assert next(csv.reader(f)) == CSV_COLUMNS
    rows = {r["config"]: r for r in _csv_rows(out / "compare.csv")}
    assert list(rows) == ["dense", "moe"]
    for name in ("dense", "moe"):
        s0, s1 = _summary(out, name, 0), _summary(out, name, 1)
        losses = [s0["final_val_loss"], s1["final_val_loss"]]
        row = rows[name]
        assert row["seeds"] == "2"
        assert float(row["final_val_loss_mean"]) == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-12)
        assert float(row["final_val_loss_std"]) == pytest.approx(statistics.stdev(losses), rel=1e-9)
        assert float(row["final_val_loss_min"]) == pytest.approx(min(losses), rel=1e-12)
        assert float(row["final_val_loss_max"]) == pytest.approx(max(losses), rel=1e-12)
        assert int(row["parameters_total"]) == s0["parameters_total"]
        assert int(row["parameters_active"]) == s0["parameters_active"]
        assert int(row["train_flops_per_token"]) == s0["train_flops_per_token"]
        assert row["diverged_runs"] == "0/2"
        # tokens/s over the whole run: 6 steps x 4 x 16 tokens / the training seconds of the last record; the same
        # as each summary's (one session), up to time_s's rounding
        per_run = []
        for seed, s in ((0, s0), (1, s1)):
            last = read_metrics(out / name / f"seed{seed}" / "metrics.jsonl")[-1]
            per_run.append(6 * 4 * 16 / last["time_s"])
            assert per_run[-1] == pytest.approx(s["tokens_per_s"], rel=2e-2)
        assert float(row["tokens_per_s"]) == pytest.approx(sum(per_run) / 2, rel=1e-9)
    # the dense model is the baseline: it reaches its own mean final loss at its final step (speedup 1)
    assert float(rows["dense"]["steps_to_baseline"]) == 6.0
    assert float(rows["dense"]["step_speedup"]) == 1.0 and rows["dense"]["reached_baseline"] == "2/2"
    assert rows["dense"]["drop_fraction"] == ""
    drops = []
    for seed in (0, 1):
        logged = [r["drop_fraction"] for r in read_metrics(out / "moe" / f"seed{seed}" / "metrics.jsonl")]
        assert len(logged) == 6
        drops.append(sum(logged) / 6)
    assert float(rows["moe"]["drop_fraction"]) == pytest.approx(sum(drops) / 2, rel=1e-9)
    assert 0.0 <= float(rows["moe"]["drop_fraction"]) < 1.0
    # compare.json holds the same rows; the Markdown table has a row per config and the baseline line
    saved = json.loads((out / "compare.json").read_text())
    assert [r["config"] for r in saved["rows"]] == ["dense", "moe"] and saved["baseline"] == "dense"
    assert saved["rows"][0]["final_val_loss_mean"] == pytest.approx(float(rows["dense"]["final_val_loss_mean"]))
    md = (out / "compare.md").read_text()
    header = md.splitlines()[0]
    for col in ("final val loss", "steps to baseline loss", "step speedup", "tokens/s", "drop fraction",
                "params total", "params active", "diverged"):
        assert col in header, col
    assert "\n| dense | 2 | " in md and "\n| moe | 2 | " in md
    assert f"mean final validation loss {float(rows['dense']['final_val_loss_mean']):.4f}" in md
    png = (out / "val_loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_rerun_trains_nothing_and_a_half_finished_run_resumes(compared):
    result, dense, moe = compared
    out = result.out_dir
    before = (out / "compare.csv").read_text()
    again = compare([str(dense), str(moe)], seeds=2, out_dir=out, log=lambda m: None, train=_fail)
    assert again.trained == [] and len(again.skipped) == 4
    assert (out / "compare.csv").read_text() == before

    # Make moe/seed1 half-finished: no summary, newest checkpoint gone -> it resumes from step 3.
    run_dir = out / "moe" / "seed1"
    original = _summary(out, "moe", 1)
    (run_dir / "summary.json").unlink()
    for p in sorted((run_dir / "checkpoints" / "step_00000006").iterdir()):
        p.unlink()
    (run_dir / "checkpoints" / "step_00000006").rmdir()
    calls = []

    def spy(cfg, path, *, resume=False, log=None):
        calls.append((Path(path), resume))
        return train_run(cfg, path, resume=resume, log=log)

    resumed = compare([str(dense), str(moe)], seeds=2, out_dir=out, log=lambda m: None, train=spy)
    assert calls == [(run_dir, True)] and resumed.trained == [run_dir]
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    # A CPU resume is bit-exact: the same final loss as the uninterrupted run, so the same table.
    assert _summary(out, "moe", 1)["final_val_loss"] == original["final_val_loss"]
    rows = {r["config"]: r for r in _csv_rows(out / "compare.csv")}
    old = {r["config"]: r for r in csv.DictReader(before.splitlines())}
    assert rows["moe"]["final_val_loss_mean"] == old["moe"]["final_val_loss_mean"]


def test_refuses_mismatched_data_same_names_and_foreign_run_dirs(compared, tmp_path):
    result, dense, moe = compared
    other = tmp_path / "longer.toml"
    other.write_text(dense.read_text().replace("seq_len = 16", "seq_len = 8"))
    with pytest.raises(MoekitError, match=r"differ in data\.seq_len: dense has 16, longer has 8"):
        compare([str(dense), str(other)], out_dir=tmp_path / "o1", train=_fail)
    longer = _rewrite(tmp_path, moe, "max_steps = 6", "max_steps = 7")
    with pytest.raises(MoekitError, match=r"differ in train\.max_steps: dense has 6, moe has 7"):
        compare([str(dense), str(longer)], out_dir=tmp_path / "o2", train=_fail)
    twin = tmp_path / "sub" / "dense.toml"
    twin.parent.mkdir()
    twin.write_text(dense.read_text())
    with pytest.raises(MoekitError, match="same name 'dense'"):
        compare([str(dense), str(twin)], out_dir=tmp_path / "o3", train=_fail)
    # The finished out dir holds lr 3e-3 runs: asking for another lr there is refused before anything trains.
    with pytest.raises(MoekitError, match=r"train\.lr = 0\.003.*asks for 0\.01"):
        compare([str(dense), str(moe)], seeds=2, overrides=["train.lr=1e-2"], out_dir=result.out_dir, train=_fail)
    with pytest.raises(MoekitError, match="--baseline 'nope' is not one of the configs"):
        compare([str(dense)], baseline="nope", out_dir=tmp_path / "o4", train=_fail)


def _rewrite(folder: Path, path: Path, old: str, new: str) -> Path:
    target = folder / f"{path.stem}.toml"
    text = path.read_text()
    assert old in text
    target.write_text(text.replace(old, new))
    return target


# ---------------------------------------------------------------------------------------------------------------
# golden arithmetic on synthetic runs


def test_run_curve_time_from_time_s_or_tokens_per_s_windows():
    with_time = [
        {"step": 10, "loss": 5.0, "time_s": 2.0, "drop_fraction": 0.2},
        {"step": 20, "loss": 4.0, "time_s": 4.5, "val_loss": 3.5, "drop_fraction": 0.1},
    ]
    curve = run_curve(with_time, tokens_per_step=64)
    assert curve["step"] == [20] and curve["val_loss"] == [3.5] and curve["time_s"] == [4.5]
    assert curve["final_time_s"] == 4.5 and curve["drop_fraction"] == pytest.approx(0.15)
    # Without time_s: each record's tokens_per_s covers the steps since the previous record; a roll-back sends the
    # step counter back (to 10) but not the clock.
    windows = [
        {"step": 10, "tokens_per_s": 100.0},
        {"step": 20, "tokens_per_s": 200.0, "val_loss": "nan"},
        {"step": 10, "event": "rollback"},
        {"step": 20, "tokens_per_s": 50.0, "val_loss": 3.0},
    ]
    curve = run_curve(windows, tokens_per_step=10)
    # 10 steps x 10 tokens / 100 = 1.0 s, + 100 / 200 = 0.5 s, + 100 / 50 = 2.0 s
    assert curve["time_s"] == pytest.approx([1.5, 3.5])
    assert math.isnan(curve["val_loss"][0]) and curve["val_loss"][1] == 3.0
    assert steps_to_target(curve, 3.0) == (20, pytest.approx(3.5))
    assert steps_to_target(curve, 2.9) is None


def _fake_run(run_dir: Path, cfg_path: Path, seed: int, evals: list[tuple[int, float, float]], **summary) -> None:
    """A finished run directory: config.toml (what the plan expects), metrics.jsonl (one record per evaluation:
    step, val_loss, time_s) and summary.json."""
    run_dir.mkdir(parents=True)
    cfg = load_run_config(str(cfg_path), [f"train.seed={seed}"])
    (run_dir / "config.toml").write_text(to_toml(cfg.resolved()))
    lines = [json.dumps({"step": s, "loss": v, "val_loss": v, "time_s": t, "drop_fraction": 0.1}) for s, v, t in evals]
    (run_dir / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    final = evals[-1][1]
    (run_dir / "summary.json").write_text(json.dumps({
        "final_val_loss": final, "steps": evals[-1][0], "rollbacks": 0, "skipped_steps": 0,
        "parameters_total": 1000, "parameters_active": 500, "train_flops_per_token": 3000, **summary,
    }))


def test_speedup_arithmetic_golden(tmp_path):
    corpus = write_tiny_corpus(tmp_path / "corpus.txt", sentences=50)
    dense, moe = _write_configs(tmp_path, corpus, max_steps=100, eval_every=25)
    slow = tmp_path / "slow.toml"
    slow.write_text(moe.read_text().replace("top_k = 1", "top_k = 2"))
    out = tmp_path / "out"
    # dense: final 3.0 and 3.2 -> target 3.1, reached (by definition) at step 100 after 50 s and 60 s on average 55 s
    _fake_run(out / "dense" / "seed0", dense, 0, [(50, 3.5, 25.0), (100, 3.0, 50.0)])
    _fake_run(out / "dense" / "seed1", dense, 1, [(50, 3.6, 30.0), (100, 3.2, 60.0)])
    # moe: seed 0 first <= 3.1 at step 50 (20 s), seed 1 at step 75 (36 s): 62.5 steps, 28 s
    _fake_run(out / "moe" / "seed0", moe, 0, [(25, 3.4, 10.0), (50, 3.05, 20.0), (75, 2.9, 30.0), (100, 2.8, 40.0)])
    _fake_run(out / "moe" / "seed1", moe, 1, [(25, 3.5, 12.0), (50, 3.2, 24.0), (75, 3.1, 36.0), (100, 2.9, 48.0)])
    # slow: one seed never reaches 3.1 -> "not reached"; one run ended non-finite -> diverged
    _fake_run(out / "slow" / "seed0", slow, 0, [(50, 3.3, 20.0), (100, 3.05, 40.0)])
    _fake_run(out / "slow" / "seed1", slow, 1, [(50, 3.3, 20.0), (100, float("nan"), 40.0)], final_val_loss="nan")
    result = compare([str(dense), str(moe), str(slow)], seeds=2, out_dir=out, log=lambda m: None, train=_fail)
    assert result.baseline == "dense" and result.target == pytest.approx(3.1)
    rows = {r["config"]: r for r in result.rows}
    assert rows["dense"]["steps_to_baseline"] == 100.0 and rows["dense"]["train_seconds_to_baseline"] == 55.0
    assert rows["moe"]["steps_to_baseline"] == 62.5 and rows["moe"]["reached_baseline"] == "2/2"
    assert rows["moe"]["step_speedup"] == pytest.approx(1.6)
    assert rows["moe"]["train_seconds_to_baseline"] == pytest.approx(28.0)
    assert rows["moe"]["wall_speedup"] == pytest.approx(55.0 / 28.0)
    assert rows["moe"]["final_val_loss_mean"] == pytest.approx(2.85)
    # tokens/s: 100 steps x 4 x 16 tokens over 40 s and 48 s
    assert rows["moe"]["tokens_per_s"] == pytest.approx((6400 / 40 + 6400 / 48) / 2)
    assert rows["moe"]["drop_fraction"] == pytest.approx(0.1)
    assert rows["slow"]["steps_to_baseline"] is None and rows["slow"]["reached_baseline"] == "1/2"
    assert rows["slow"]["step_speedup"] is None and rows["slow"]["diverged_runs"] == "1/2"
    # the mean is over the runs that ended finite; one value has no sample std
    assert rows["slow"]["final_val_loss_mean"] == pytest.approx(3.05) and rows["slow"]["final_val_loss_std"] is None

    md = (out / "compare.md").read_text()
    assert "| moe | 2 | 2.850 ± 0.071 [2.800, 2.900] | 62 | 1.60x | 28.0 | 1.96x |" in md
    assert "| slow | 2 | 3.050 | not reached (1/2) | - | - | - |" in md
    csv_rows = {r["config"]: r for r in _csv_rows(out / "compare.csv")}
    assert csv_rows["slow"]["steps_to_baseline"] == "" and csv_rows["moe"]["step_speedup"] == "1.6"
    # a spike above ln(vocab) = ln(300) = 5.70 (worse than a uniform prediction) counts as diverged even when the
    # run recovers: a float32 blow-up seldom gives NaN
    spiky = tmp_path / "spiky.toml"
    spiky.write_text(moe.read_text().replace("top_k = 1", "top_k = 3"))
    _fake_run(out / "spiky" / "seed0", spiky, 0, [(50, 5.71, 20.0), (100, 3.0, 40.0)])
    _fake_run(out / "spiky" / "seed1", spiky, 1, [(50, 5.69, 20.0), (100, 3.0, 40.0)])
    again = compare([str(dense), str(spiky)], seeds=2, out_dir=out, log=lambda m: None, train=_fail)
    assert {r["config"]: r["diverged_runs"] for r in again.rows} == {"dense": "0/2", "spiky": "1/2"}
    # without a dense config there is no baseline and no speedup column
    only_moe = compare([str(moe), str(slow)], seeds=2, out_dir=out, log=lambda m: None, train=_fail)
    assert only_moe.baseline is None
    assert "step_speedup" not in (out / "compare.csv").read_text().splitlines()[0]
    # --baseline none: the same runs, no target and no speedup columns although a dense arm is there
    none = compare([str(dense), str(moe)], seeds=2, out_dir=out, baseline="none", log=lambda m: None, train=_fail)
    assert none.baseline is None and none.target is None
    assert all(r["step_speedup"] is None for r in none.rows)
    assert {r["config"]: r["final_val_loss_mean"] for r in none.rows}["moe"] == pytest.approx(2.85)


def test_accuracy_column_when_summaries_have_it(tmp_path):
    corpus = write_tiny_corpus(tmp_path / "corpus.txt", sentences=50)
    dense, moe = _write_configs(tmp_path, corpus, max_steps=100, eval_every=50)
    out = tmp_path / "out"
    _fake_run(out / "dense" / "seed0", dense, 0, [(100, 1.0, 5.0)], final_val_accuracy=0.8)
    _fake_run(out / "moe" / "seed0", moe, 0, [(100, 0.9, 5.0)], final_val_accuracy=0.9)
    compare([str(dense), str(moe)], out_dir=out, log=lambda m: None, train=_fail)
    rows = {r["config"]: r for r in _csv_rows(out / "compare.csv")}
    assert float(rows["moe"]["final_val_accuracy_mean"]) == 0.9 and rows["moe"]["final_val_accuracy_std"] == ""
    assert "final val accuracy" in (out / "compare.md").read_text().splitlines()[0]
