"""The benchmark scripts run end to end on tiny shapes and report numbers that are internally consistent."""

import importlib.util
import json
import math
from pathlib import Path

import pytest

from moekit.lab.bench.layer import command_line, run_benchmark
from moekit.lab.cli import main

ROOT = Path(__file__).resolve().parents[2]


def _table_rows(md: str) -> list[list[str]]:
    """The data rows of the first Markdown table (the times), as stripped cells."""
    rows = []
    for line in md.splitlines():
        if line.startswith("| ") and not line.startswith("| allocator") and not line.startswith("| act"):
            rows.append([c.strip() for c in line.split("|")[1:-1]])
        elif rows and not line.startswith("|"):
            break
    return rows


_COLS = ("moe", "dense", "hf_grouped", "hf_eager", "loop", "einsum", "moe_cf1.25")


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_benchmark_tiny(tmp_path, activation):
    cases = run_benchmark([4], [1, 2], tokens=64, d_model=16, d_ff=32, rounds=3, threads=1, out_dir=tmp_path,
                          command="test", measure_memory=False, activations=(activation,))
    assert [(c.num_experts, c.top_k) for c in cases] == [(4, 1), (4, 2)]
    hf = importlib.util.find_spec("transformers") is not None and activation == "swiglu"
    expected = {"moe", "moe_cf1.25", "dense", "einsum", "loop"} | ({"hf_eager", "hf_grouped"} if hf else set())
    for c in cases:
        assert set(c.times_ms) == expected
        assert all(len(v) == 3 and min(v) > 0 for v in c.times_ms.values())
        # Every dropless peer was checked equal to moekit before it was timed.
        assert set(c.max_abs_diff) == expected & {"loop", "hf_eager", "hf_grouped"}
        assert all(d < 1e-5 for d in c.max_abs_diff.values())
    data = json.loads((tmp_path / "layer_throughput.json").read_text())
    assert data["meta"]["tokens"] == 64 and data["meta"]["rounds"] == 3 and len(data["cases"]) == 2
    # Every number of the Markdown table, recomputed from the raw per-round times in the JSON: median (min-max) of
    # the three rounds and the ratios of the medians, to the printed precision.
    rows = _table_rows((tmp_path / "layer_throughput.md").read_text())
    assert len(rows) == 2
    for row, case in zip(rows, data["cases"], strict=True):
        assert (row[1], int(row[2]), int(row[3])) == (activation, case["num_experts"], case["top_k"])
        med = {v: sorted(t)[1] for v, t in case["times_ms"].items()}
        for col, v in enumerate(_COLS, start=4):
            if v not in med:
                assert row[col] == "-"
                continue
            median, spread = row[col].split(" ", 1)
            lo, hi = spread.strip("()").split("-")
            assert float(median) == pytest.approx(med[v], abs=0.051), v
            assert float(lo) == pytest.approx(min(case["times_ms"][v]), abs=0.51)
            assert float(hi) == pytest.approx(max(case["times_ms"][v]), abs=0.51)
        assert float(row[11]) == pytest.approx(med["moe"] / med["dense"], abs=0.0051)
        if hf:
            best = min(med["hf_eager"], med["hf_grouped"])
            assert float(row[12]) == pytest.approx(best / med["moe"], abs=0.0051)
        else:
            assert row[12] == "-"
    assert "Peak memory" not in (tmp_path / "layer_throughput.md").read_text()  # not measured: not invented


def test_bench_writes_a_new_run_folder_never_the_committed_results(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--experts", "2", "--top-k", "1", "--tokens", "16", "--d-model", "8", "--d-ff", "16",
            "--rounds", "2", "--warmup", "1", "--allocators", "default", "--activations", "gelu",
            "--variants", "moe", "dense", "--no-memory", "--threads", "1", "--no-tune-malloc"]
    assert main(argv) == 0
    runs = sorted((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("bench-")
    assert {p.name for p in runs[0].iterdir()} == {"layer_throughput.json", "layer_throughput.md"}
    assert not (tmp_path / "benchmarks").exists()
    out = capsys.readouterr().out
    assert "16 tokens, d_model 8, d_ff 16" in out and "median (min-max)" in out and "ms" in out
    data = json.loads((runs[0] / "layer_throughput.json").read_text())
    assert [c["malloc"] for c in data["cases"]] == ["default"] and data["meta"]["warmup"] == 1


def test_bench_cpu_clock_end_to_end(tmp_path, monkeypatch, capsys):
    """``--clock cpu`` reaches the timing child and the results say which clock timed them."""
    monkeypatch.chdir(tmp_path)
    argv = ["bench", "--experts", "2", "--top-k", "1", "--tokens", "16", "--d-model", "8", "--d-ff", "16",
            "--rounds", "2", "--warmup", "1", "--allocators", "default", "--activations", "gelu",
            "--variants", "moe", "dense", "--no-memory", "--threads", "1", "--clock", "cpu", "--out", "out"]
    assert main(argv) == 0
    data = json.loads((tmp_path / "out" / "layer_throughput.json").read_text())
    assert data["meta"]["clock"] == "cpu"
    assert all(len(t) == 2 and min(t) > 0 for t in data["cases"][0]["times_ms"].values())
    assert "Times are CPU milliseconds" in (tmp_path / "out" / "layer_throughput.md").read_text()


def test_time_case_reads_the_chosen_clock(monkeypatch):
    """Each timed step is the difference of two readings of the chosen clock (a fake one here that advances 5 ms
    per reading, so every step takes exactly 5 ms), not of the wall clock."""
    import itertools

    import moekit.lab.bench.layer as layer

    ticks = itertools.count()
    monkeypatch.setitem(layer.CLOCKS, "cpu", lambda: next(ticks) * 0.005)
    case = layer.Case(num_experts=2, top_k=1, tokens=8, d_model=8, d_ff=16)
    layer.time_case(case, ("moe", "dense"), rounds=3, warmup=0, clock="cpu")
    assert case.times_ms == {"moe": [pytest.approx(5.0)] * 3, "dense": [pytest.approx(5.0)] * 3}


def test_bench_cpu_clock_needs_one_thread(capsys):
    assert main(["bench", "--clock", "cpu", "--threads", "2", "--no-tune-malloc"]) == 2
    assert "--clock cpu needs --threads 1" in capsys.readouterr().err


def test_new_run_dir_never_reuses_a_folder(tmp_path):
    from moekit.lab.bench.layer import new_run_dir

    first, second = new_run_dir(tmp_path / "runs"), new_run_dir(tmp_path / "runs")
    assert first != second and first.is_dir() and second.is_dir()


def test_quick_says_it_is_a_smoke_test(tmp_path, monkeypatch, capsys):
    import moekit.lab.bench.layer as layer

    calls = {}

    def fake_run_allocators(*args, **kwargs):  # the quick sizes and warm-up reach the timing, nothing is timed
        calls.update(kwargs, args=args)
        return []

    monkeypatch.setattr(layer, "run_allocators", fake_run_allocators)
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--quick", "--no-tune-malloc"]) == 0
    out = capsys.readouterr().out
    assert "smoke test" in out and "median (min-max)" in out
    assert calls["warmup"] >= 1 and calls["args"][:5] == ([4], [1, 2], 512, 64, 128)
    md = next((tmp_path / "runs").iterdir()) / "layer_throughput.md"
    assert "smoke test" in md.read_text()
    assert "Each case (allocator setting, activation, E, k) ran in its own fresh process." in md.read_text()


def test_bench_parser_names_match_the_module():
    from moekit.experts.activations import ACTIVATIONS
    from moekit.lab.bench.layer import VARIANTS
    from moekit.lab.commands import bench

    assert bench.VARIANTS == VARIANTS and set(bench.ACTIVATION_NAMES) == set(ACTIVATIONS)


def test_bench_command_rejects_bad_sizes(capsys):
    assert main(["bench", "--tokens", "0"]) == 2
    assert "--tokens must be >= 1" in capsys.readouterr().err


def test_gpu_benchmark_script_smoke_on_cpu(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_layer", ROOT / "benchmarks" / "gpu_layer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--device", "cpu", "--small", "--iters", "1", "--cases", "b", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "gpu_layer_cpu.json").read_text())
    b = data["cases"]["b"]
    assert b["moe_over_dense_tflops"] == pytest.approx(b["moe"]["tflops"] / b["dense"]["tflops"])
    assert b["loop_over_moe_time"] == pytest.approx(b["loop"]["ms"] / b["moe"]["ms"])


def test_expert_parallel_benchmark_smoke(tmp_path, monkeypatch):
    # Imported by name (not from a file spec) so the spawned ranks can unpickle its worker function.
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import expert_parallel

    out = tmp_path / "ep.md"
    args = ["--batch", "4", "--seq-len", "8", "--d-model", "16", "--d-ff", "32", "--experts", "4", "--vocab", "50",
            "--steps", "2", "--warmup", "1", "--out", str(out)]
    assert expert_parallel.main(args) == 0
    rows = [line for line in out.read_text().splitlines() if line.startswith("| 1 |") or line.startswith("| 2 |")]
    assert [r.split("|")[2].strip() for r in rows] == ["1 x 1", "1 x 2", "2 x 1"]
    share = float(rows[2].split("|")[5].strip().rstrip("%"))
    assert 0.0 < share < 100.0


def test_vit_benchmark_smoke_on_digits(tmp_path):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("vit_fashion_mnist", ROOT / "benchmarks" / "vit_fashion_mnist.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    args = ["--seeds", "2", "--arms", "vit-dense", "vit-softmoe", "--out", str(tmp_path / "out"),
            "--results", str(tmp_path / "res"), "--time-rounds", "1"]
    for item in ["data.dataset=digits", "model.patch_size=2", "train.max_steps=4", "train.batch_size=16",
                 "train.eval_every=2", "train.warmup_steps=1", "train.progress=off", "train.threads=1"]:
        args += ["--set", item]
    assert mod.main(args) == 0
    table = (tmp_path / "res" / "accuracy.md").read_text().splitlines()
    assert [line.split("|")[1].strip() for line in table[2:]] == ["dense", "Soft MoE, 16 x 1 slot"]
    # the accuracy columns are the mean / min / max of the two seeds' summaries
    accs = [json.loads((tmp_path / "out" / "vit-softmoe" / f"seed{s}" / "summary.json").read_text())[
        "final_val_accuracy"] for s in (0, 1)]
    cells = table[3].split("|")
    assert float(cells[2]) == pytest.approx(sum(accs) / 2, abs=6e-5)
    assert float(cells[4]) == pytest.approx(min(accs), abs=6e-5)
    assert float(cells[5]) == pytest.approx(max(accs), abs=6e-5)
    assert cells[7].strip() in ("0 (none dropped)", "0.0%")
    assert (tmp_path / "res" / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    timing = (tmp_path / "res" / "step_time.md").read_text().splitlines()
    assert timing[2].split("|")[3].strip() == "1.00"  # dense / dense


def _fake_lfb_run(run_dir, loss, loads):
    run_dir.mkdir(parents=True)
    records = [{"step": s, "loss": 5.0, "tokens_per_expert": [loads], "drop_fraction": 0.1} for s in (10, 20, 30, 40)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (run_dir / "summary.json").write_text(json.dumps({"final_val_loss": loss}))


def test_loss_free_balancing_analysis_by_hand(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import loss_free_balancing as lfb

    out = tmp_path / "out"
    for score in ("softmax", "sigmoid"):
        for arm, losses, loads in (("aux", [5.0, 5.1, 5.2], [4, 2, 2, 0]),   # max violation 4 / 2 = 2.0
                                   ("bias", [4.9, 5.0, 5.0], [3, 2, 2, 1]),  # 3 / 2 = 1.5
                                   ("both", [5.0, 5.2, 5.3], [2, 2, 2, 2])):  # 1.0
            for seed, loss in enumerate(losses):
                _fake_lfb_run(out / score / f"lfb-{score}-{arm}" / f"seed{seed}", loss, loads)
    assert lfb.main([str(out), "--results", str(tmp_path / "res")]) == 0
    saved = json.loads((tmp_path / "res" / "loss_free.json").read_text())
    bias = saved["paired"]["softmax: bias - aux"]
    # bias - aux, paired by seed: losses -0.1, -0.1, -0.2 -> mean -0.1333, sd 0.0577, half-width
    # 4.303 * 0.0577 / sqrt(3) = 0.1434: the interval [-0.277, 0.010] includes zero
    assert bias["final_val_loss"]["mean"] == pytest.approx(-0.4 / 3)
    assert bias["final_val_loss"]["half_width"] == pytest.approx(4.303 * 0.057735 / math.sqrt(3), rel=1e-4)
    assert bias["final_val_loss"]["verdict"] == "not resolved at this scale"
    # max violation 1.5 - 2.0 = -0.5 on every seed: zero spread, below zero: the paper's side
    assert bias["max_violation"]["mean"] == pytest.approx(-0.5) and bias["max_violation"]["verdict"] == "reproduced"
    both = saved["paired"]["sigmoid: both - aux"]
    # both - aux losses: 0.0, +0.1, +0.1 -> mean 0.0667, half-width 4.303 * 0.0577 / sqrt(3) = 0.1434: unresolved
    assert both["final_val_loss"]["mean"] == pytest.approx(0.2 / 3)
    assert both["drop_fraction"]["verdict"] == "not resolved at this scale"  # 0.1 - 0.1 = 0 on every seed
    assert (tmp_path / "res" / "max_violation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| lfb-softmax-aux | 3 | 5.1000 ± 0.2484 | 2.000 ± 0.000 | 0.1000 ± 0.0000 |" in (
        tmp_path / "res" / "loss_free.md").read_text()


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_memory_script_tiny(tmp_path):
    """benchmarks/layer_memory.py on tiny shapes: the live-tensor peak is exact (the same twice), at least the weight
    gradients the step creates, and the Markdown ratio is the JSON's."""
    script = _load_script("layer_memory")
    E, D, F, S = 4, 16, 32, 64
    hf = importlib.util.find_spec("transformers") is not None
    variants = ["moe", "dense"] + (["hf_grouped"] if hf else [])
    assert script.main(["--experts", str(E), "--top-k", "2", "--tokens", str(S), "--d-model", str(D), "--d-ff", str(F),
                        "--rss-repeats", "0", "--variants", *variants, "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "layer_memory.json").read_text())
    (row,) = data["rows"]
    live = row["live_mib"]
    assert set(live) == set(variants) and row["rss_mib"] == {}
    # The step creates the gradients of w_in, w_gate and w_out (3 * E * D * F floats) and of the router (D * E),
    # and x's gradient (S * D), all alive at the end: a floor for the peak.
    floor = (3 * E * D * F + D * E + S * D) * 4 / 2**20
    assert live["moe"] >= floor
    case = script.Case(num_experts=E, top_k=2, tokens=S, d_model=D, d_ff=F, activation="swiglu")
    assert script.live_peak_mib("moe", case) == pytest.approx(live["moe"], abs=0.05)
    md_row = [c.strip() for c in (tmp_path / "layer_memory.md").read_text().splitlines()[-1].split("|")[1:-1]]
    if hf:
        assert float(md_row[3 + len(variants)]) == pytest.approx(live["moe"] / live["hf_grouped"], abs=0.0006)
    else:
        assert md_row[3 + len(variants)] == "-"


def test_run_allocators_times_every_case_in_its_own_process(monkeypatch):
    """One child per (allocator, activation, E, k), so no case inherits another's heap; the tuned children tune the
    allocator and the default ones do not; the cases come back in the order asked."""
    import subprocess
    from dataclasses import asdict

    import moekit.lab.bench.layer as layer

    children = []

    def fake_run(argv, **kwargs):
        code = argv[-1]
        spec = json.loads(json.loads(code.split("timing_child(")[1].rsplit(", ", 1)[0]))
        malloc = code.rsplit(", ", 1)[1].strip("')\"")
        children.append((malloc, "tune_malloc()" in code, spec["activations"], spec["experts"], spec["top_ks"]))
        case = layer.Case(num_experts=spec["experts"][0], top_k=spec["top_ks"][0], tokens=spec["tokens"],
                          d_model=spec["d_model"], d_ff=spec["d_ff"], activation=spec["activations"][0],
                          malloc=malloc)
        return subprocess.CompletedProcess(argv, 0, stdout="progress\n" + json.dumps([asdict(case)]) + "\n")

    monkeypatch.setattr(layer.subprocess, "run", fake_run)
    cases = layer.run_allocators([2, 8], [1, 2], 16, 8, 16, rounds=1, threads=1, activations=("swiglu",))
    assert children == [
        (m, m == "tuned", ["swiglu"], [E], [k]) for m in ("default", "tuned") for E in (2, 8) for k in (1, 2)
    ]
    assert [(c.malloc, c.num_experts, c.top_k) for c in cases] == [
        (m, E, k) for m in ("default", "tuned") for E in (2, 8) for k in (1, 2)
    ]


def test_run_allocators_rejects_top_k_above_experts_before_timing(monkeypatch):
    import moekit.lab.bench.layer as layer
    from moekit.errors import ConfigError

    def no_child(*args, **kwargs):
        raise AssertionError("a child process started before the sizes were checked")

    monkeypatch.setattr(layer.subprocess, "run", no_child)
    with pytest.raises(ConfigError, match="top_k=2 must be <= num_experts=1"):
        layer.run_allocators([8, 1], [2], 16, 8, 16, rounds=1, threads=1)


def test_layer_profile_script_tiny(tmp_path):
    """benchmarks/layer_profile.py on tiny shapes: GEMM calls counted exactly, the step split into GEMM and other
    time, and the bounds computed from the table's own figures."""
    script = _load_script("layer_profile")
    E, D, F, S = 4, 16, 32, 64
    hf = importlib.util.find_spec("transformers") is not None
    variants = ["moe", "dense"] + (["hf_grouped"] if hf else [])
    assert script.main(["--experts", str(E), "--top-k", "2", "--tokens", str(S), "--d-model", str(D), "--d-ff", str(F),
                        "--rounds", "2", "--allocator", "default", "--variants", *variants,
                        "--out", str(tmp_path)]) == 0
    (row,) = json.loads((tmp_path / "layer_profile.json").read_text())["rows"]
    moe, dense = row["variants"]["moe"], row["variants"]["dense"]
    # moekit: 7 GEMMs per expert (forward gate|up and down; backward: the down projection's input and weight
    # gradients, the gate and up weight gradients apart, their joint input gradient), every expert holding rows of
    # 64 tokens x 2 choices, plus the router's forward, input and weight gradients: 7 * 4 + 3 = 31.
    assert moe["gemm_calls"] == 7 * E + 3
    assert dense["gemm_calls"] == 9  # gate, up, down forward; an input and a weight gradient for each
    for s in row["variants"].values():
        assert s["total_ms"] == pytest.approx(s["gemm_ms"] + s["other_ms"], rel=1e-6, abs=1e-6)
        assert all(name not in script.GEMM_OPS for name, _ in s["top_other"])
    b = row["bounds"]
    assert b["moe_over_dense"] == pytest.approx(moe["total_ms"] / dense["total_ms"])
    if hf:
        assert b["hf_over_1_2_ms"] == pytest.approx(row["variants"]["hf_grouped"]["total_ms"] / 1.2)
        assert b["best_hf_over_moe_gemms_only"] == pytest.approx(row["variants"]["hf_grouped"]["total_ms"]
                                                                  / moe["gemm_ms"])
    md = (tmp_path / "layer_profile.md").read_text()
    assert f"| {E} | 2 | moe | {moe['total_ms']:.0f} | {moe['gemm_ms']:.0f} | {7 * E + 3} |" in md


def test_results_record_the_command_as_it_was_typed():
    assert command_line(["/x/bin/moekit", "bench", "--quick"]) == "moekit bench --quick"
    assert command_line(["/x/moekit/__main__.py", "bench", "--rounds", "3"]) == "moekit bench --rounds 3"
    assert (command_line(["benchmarks/layer_throughput.py", "--experts", "8"])
            == "python benchmarks/layer_throughput.py --experts 8")
