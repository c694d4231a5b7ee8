"""What moekit's plots show, read from the matplotlib Figures their ``*_figure`` functions return: the axis labels
(with units), the titles, and how many series each panel draws (lines, stacked bands, heatmaps)."""

from __future__ import annotations

import pytest

pytest.importorskip("matplotlib")

from moekit.lab.adapters.experiments import routing_figure  # noqa: E402
from moekit.lab.analysis.plots import load_figure_object  # noqa: E402
from moekit.lab.training.compare import compare_figure  # noqa: E402
from moekit.lab.training.plots import (  # noqa: E402
    expert_load_figure,
    load_balance_figure,
    loss_figure,
    moe_layer_names,
)
from moekit.lab.training.run_config import load_run_config, to_toml  # noqa: E402


def _legend(ax) -> list[str]:  # noqa: ANN001
    return [t.get_text() for t in ax.get_legend().get_texts()]


def _records(num_experts: int, drop: float) -> list[dict]:
    return [{"step": s, "loss": 5.0 - 0.1 * s, "ce_loss": 4.9 - 0.1 * s, **({"val_loss": 4.8} if s == 4 else {}),
             "tokens_per_expert": [[8 + (e + s) % 3 for e in range(num_experts)], [8] * num_experts],
             "drop_fraction_per_layer": [drop, 0.0]} for s in (2, 4, 6)]


def test_loss_figure_of_a_distillation_names_its_objective_and_shows_the_teacher():
    fig = loss_figure(_records(4, 0.0), title="student", unigram_baseline=6.0, teacher_loss=4.5,
                      objective="0.75 x label CE + 0.25 x CE against the teacher")
    (ax,) = fig.axes
    assert (ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) == (
        "optimizer step", "cross-entropy (nats per token)", "student: loss")
    assert len(ax.get_lines()) == 5
    assert _legend(ax) == [
        "training cross-entropy (labels)",
        "training objective: 0.75 x label CE + 0.25 x CE against the teacher",
        "validation cross-entropy",
        "teacher validation cross-entropy 4.50",
        "unigram baseline 6.00",
    ]
    # An objective equal to the cross-entropy (a dense run) is not drawn twice; an image classifier's unit.
    same = [{**r, "loss": r["ce_loss"]} for r in _records(4, 0.0)]
    (ax,) = loss_figure(same, per="image").axes
    assert len(ax.get_lines()) == 2 and ax.get_ylabel() == "cross-entropy (nats per image)"


def test_expert_load_of_few_experts_is_stacked_with_a_dropped_band_only_when_it_dropped():
    fig = expert_load_figure(_records(4, 0.25), ["block 1", "block 3"], title="run")
    top, bottom = (row for row in fig.axes)
    assert top.get_ylabel() == "block 1\n% of routed assignments"
    assert bottom.get_xlabel() == "optimizer step"
    assert len(top.collections) == 5 and len(bottom.collections) == 4  # 4 bands (+ dropped in block 1)
    assert _legend(top) == ["expert 0", "expert 1", "expert 2", "expert 3", "dropped (over capacity)"]
    assert _legend(bottom) == ["expert 0", "expert 1", "expert 2", "expert 3"]
    assert top.get_title() == "block 1: dropped 25.0% of assignments on average"
    assert bottom.get_title() == "block 3: every expert equally loaded at every step (balanced by construction)"
    assert fig._suptitle.get_text() == "run: share of routed assignments per expert (dotted line: an even split)"


def test_expert_load_of_many_experts_is_a_heatmap_with_a_labelled_colour_bar():
    fig = expert_load_figure(_records(16, 0.0), ["block 2", "block 3"])
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert len(panels) == 2 and len(bars) == 2
    assert [len(ax.images) for ax in panels] == [1, 1]
    assert panels[0].images[0].get_array().shape == (16, 3)  # experts x logged steps
    assert panels[0].get_ylabel() == "block 2\nexpert" and panels[1].get_xlabel() == "optimizer step"
    assert bars[0].get_ylabel() == "load / balanced load"
    assert panels[1].get_title() == "block 3: every expert equally loaded at every step (balanced by construction)"
    assert fig._suptitle.get_text() == "tokens per expert relative to an even split"


def test_load_balance_figure_names_layers_by_block():
    records = [{**r, "expert_bias_range_per_layer": [0.1, 0.2]} for r in _records(4, 0.0)]
    top, bottom = load_balance_figure(records, ["block 1", "block 3"], title="run").axes
    assert top.get_ylabel() == "busiest expert's load / mean load"
    assert bottom.get_ylabel() == "expert bias max - min\n(router score units)"
    assert bottom.get_xlabel() == "optimizer step"
    assert len(top.get_lines()) == 3 and _legend(top) == ["block 1", "block 3"]  # + the line at 1


def test_moe_layer_names_follow_the_run_config(tmp_path):
    (tmp_path / "config.toml").write_text(to_toml(load_run_config(None).resolved()))
    assert moe_layer_names(tmp_path, 2) == ["block 1", "block 3"]  # switch-tiny: MoE in blocks 1 and 3
    assert moe_layer_names(tmp_path, 3) == ["MoE layer 0", "MoE layer 1", "MoE layer 2"]  # does not match
    assert moe_layer_names(tmp_path / "missing", 1) == ["MoE layer 0"]


def test_compare_figure_labels_both_panels():
    runs = {name: [{"curve": {"step": [10, 20], "time_s": [1.0, 2.0], "val_loss": [5.0, 4.0 + i],
                              "val_accuracy": []}}] for i, name in enumerate(("moe", "dense"))}
    left, right = compare_figure(runs, 4.5, per="token").axes
    assert (left.get_xlabel(), right.get_xlabel()) == ("optimizer step", "training time (s, evaluation excluded)")
    assert left.get_ylabel() == "validation cross-entropy (nats per token)"
    assert len(left.get_lines()) == 3 and _legend(left) == ["moe", "dense", "baseline's final loss 4.500"]


def test_analysis_load_figure_draws_dropped_bars_only_when_a_layer_dropped():
    def layer(block: int, chosen: list[int], kept: list[int]) -> dict:
        dropped = 1 - sum(kept) / sum(chosen)
        return {"block": block, "load": {"chosen_per_expert": chosen, "kept_per_expert": kept,
                                         "dropped_share": dropped, "entropy_normalised": 0.9}}

    summary = {"num_experts": 4, "layers": [layer(1, [4, 4, 8, 0], [4, 4, 5, 0]), layer(3, [4] * 4, [4] * 4)]}
    first, second, last = load_figure_object(summary).axes
    assert (first.get_xlabel(), first.get_ylabel()) == ("expert", "% of routed assignments")
    assert first.get_title() == "block 1: load (dropped 18.8%)" and second.get_title() == "block 3: load"
    assert len(first.patches) == 8 and len(second.patches) == 4  # kept + dropped bars; kept only
    assert _legend(second) == ["even split", "kept"]
    assert (last.get_xlabel(), last.get_ylabel()) == ("MoE layer", "fraction (0 to 1)")
    assert [t.get_text() for t in last.get_xticklabels()] == ["block 1", "block 3"]


def test_adapter_routing_figure_names_blocks_and_labels_the_colour_bar():
    cfg = {"method": "mov", "num_experts": 2, "routing": "soft", "top_k": 2, "router_input": "token", "r": 4,
           "seen_tasks": ["a"], "heldout_tasks": ["b"]}
    result = {"name": "mov2", "config": cfg, "routing": {t: {"encoder.layer.0.output.dense": [0.25, 0.75],
                                                             "encoder.layer.5.output.dense": [0.5, 0.5]}
                                                         for t in ("a", "b")}}
    fig = routing_figure(result)
    panels = [ax for ax in fig.axes if ax.get_label() != "<colorbar>"]
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    assert [ax.get_title() for ax in panels] == ["block 0: output.dense", "block 5: output.dense"]
    assert (panels[0].get_xlabel(), panels[0].get_ylabel()) == ("expert", "task")
    assert [len(ax.images) for ax in panels] == [1, 1]
    assert [b.get_ylabel() for b in bars] == ["mean routing probability"] * 2
