"""ViT runs through the shared trainer: run-config checks for ``model.arch = "vit"``, a digits run end to end
(accuracy in metrics and summary, the eval command agrees), bit-exact resume, and the named vit-*.toml recipes
(valid, round-tripping, equal FFN FLOPs per image)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib

pytest.importorskip("sklearn")

from moekit.errors import MoekitError  # noqa: E402
from moekit.lab.cli import main  # noqa: E402
from moekit.lab.training.run import read_run_config, train_run  # noqa: E402
from moekit.lab.training.run_config import build_run_config, load_run_config, to_toml  # noqa: E402
from moekit.layers.config import SoftMoEConfig  # noqa: E402
from moekit.models.vit import vit_flops_per_image  # noqa: E402
from moekit.training.metrics import read_metrics  # noqa: E402

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
VIT_CONFIGS = [
    "vit-dense",
    "vit-top1",
    "vit-top1-cf125",
    "vit-top2",
    "vit-top2-cf125",
    "vit-ec",
    "vit-softmoe",
    "vit-softmoe-2slots",
]
# Digits are 8x8: 2x2 patches give the same 16 tokens per image as Fashion-MNIST's 7x7 patches of 28x28.
DIGITS = ["data.dataset=digits", "model.patch_size=2"]


def _digits_config(name: str, *extra: str):
    return load_run_config(
        CONFIGS / f"{name}.toml",
        DIGITS
        + [
            "train.max_steps=20",
            "train.batch_size=32",
            "train.eval_every=10",
            "train.checkpoint_every=10",
            "train.warmup_steps=2",
            "train.log_every=1",
            "train.progress=off",
            "train.threads=1",
            *extra,
        ],
    )


def _silent(msg: str) -> None:
    pass


@pytest.mark.parametrize("name", VIT_CONFIGS)
def test_vit_configs_validate_and_round_trip(name):
    cfg = load_run_config(CONFIGS / f"{name}.toml")
    assert cfg.arch == "vit" and cfg.data.dataset == "fashion_mnist"
    # the image geometry follows from the data set
    vit = cfg.model
    assert (vit.image_size, vit.in_channels, vit.num_classes, vit.num_tokens) == (28, 1, 10, 16)
    again = build_run_config(tomllib.loads(to_toml(cfg.resolved())))
    assert again.resolved() == cfg.resolved()


def test_vit_configs_spend_equal_ffn_flops_per_image():
    """The recipes are matched in FFN FLOPs; what differs is routing overhead (router matmul; Soft MoE's
    dispatch and combine einsums), which must stay small next to the whole model."""
    flops = {
        n: vit_flops_per_image(load_run_config(CONFIGS / f"{n}.toml").model)["forward"] for n in VIT_CONFIGS
    }
    dense = flops["vit-dense"]
    for name, value in flops.items():
        assert dense <= value <= 1.06 * dense, (name, value / dense)
    soft = load_run_config(CONFIGS / "vit-softmoe.toml").model
    assert isinstance(soft.moe, SoftMoEConfig)
    # total slots = tokens: the condition for dense-matched FLOPs (docs/ALGORITHMS.md section 4)
    assert soft.moe.num_experts * soft.moe.slots_per_expert == soft.num_tokens


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model.patch_sise=2"], r"unknown config key 'model.patch_sise' \(did you mean 'patch_size'\?\)"),
        (["model.image_size=32"], r"model.image_size = 32 but data.dataset = 'fashion_mnist' has image_size 28"),
        (['model.arch="cnn"'], r"model.arch must be one of \('lm', 'vit', 'seq2seq'\)"),
        (["moe.top_k=2"], r"unknown config key 'moe.top_k' for moe.router = 'soft'"),
        (["parallel.expert_parallel=3"], r"parallel.expert_parallel = 3 must divide moe.num_experts = 16"),
        (["parallel.expert_parallel=2", "train.batch_size=3"], r"train.batch_size = 3 \(the global batch\) must be"),
        (['data.corpus="sotu"'], r"unknown config key 'data.corpus'"),
    ],
)
def test_vit_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(CONFIGS / "vit-softmoe.toml", overrides)


def test_soft_moe_is_refused_in_the_language_model():
    with pytest.raises(ValueError, match="refused in the causal TransformerLM"):
        load_run_config(None, ['moe.router="soft"'])


def test_digits_vit_run_end_to_end_and_eval_agrees(tmp_path, capsys):
    cfg = _digits_config("vit-top1", "train.max_steps=40", "train.eval_every=20", "train.lr=3e-3",
                         "train.progress=plain")
    summary = train_run(cfg, tmp_path / "run", log=_silent)
    # The progress line counts images, not tokens.
    progress = capsys.readouterr().err
    assert " images/s" in progress and "tok/s" not in progress
    records = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 41))
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [20, 40]
    # accuracy is a fraction of the 300 fixed test images
    for r in evals:
        assert 0.0 <= r["val_accuracy"] <= 1.0 and abs(r["val_accuracy"] * 300 - round(r["val_accuracy"] * 300)) < 1e-9
    # training time accumulates step by step
    times = [r["time_s"] for r in records]
    assert all(b > a for a, b in zip(times, times[1:], strict=False))
    assert summary["final_val_accuracy"] == evals[-1]["val_accuracy"]
    assert summary["final_val_loss"] == evals[-1]["val_loss"]
    assert summary["arch"] == "vit" and 0.0 < summary["majority_val_accuracy"] < 0.2
    # 40 steps of 32 images learn something on 10 balanced classes (chance 0.1)
    assert summary["final_val_accuracy"] > 0.3  # 3x chance
    # tokens/s counts images for a classifier: 40 x 32 images in train_time_s
    assert summary["tokens_per_s"] == pytest.approx(1280 / summary["train_time_s"], rel=1e-6)
    assert (tmp_path / "run" / "plots" / "accuracy.png").is_file()
    saved = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert saved["final_val_accuracy"] == summary["final_val_accuracy"]
    # The config written to the run directory and stored in the checkpoint reads back to the typed config.
    assert read_run_config(tmp_path / "run") == cfg
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000040" / "state.json").read_text())
    assert build_run_config(state["config"]) == cfg

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert f"test accuracy {summary['final_val_accuracy']:.4f}" in out
    # language-model commands refuse a ViT run in one line
    assert main(["generate", str(tmp_path / "run"), "--prompt", "x"]) != 0
    assert "is an image classifier (model.arch = 'vit') run" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["vit-softmoe", "vit-ec"])
def test_vit_resume_is_bit_exact(tmp_path, name):
    # A constant schedule after warm-up, so stopping at step 10 and going on to 20 (a larger max_steps on
    # resume) sees the same learning rates as one run of 20 steps.
    const = 'train.schedule="constant"'
    ref = train_run(_digits_config(name, const), tmp_path / "ref", log=_silent)
    train_run(_digits_config(name, const, "train.max_steps=10"), tmp_path / "cut", log=_silent)
    resumed = train_run(_digits_config(name, const), tmp_path / "cut", resume=True, log=_silent)
    assert resumed["final_val_accuracy"] == ref["final_val_accuracy"]

    def losses(d):
        return {r["step"]: r["loss"] for r in read_metrics(tmp_path / d / "metrics.jsonl") if "loss" in r}

    assert losses("cut") == losses("ref")


def test_missing_image_directory_is_a_clear_error(tmp_path):
    cfg = load_run_config(CONFIGS / "vit-dense.toml", [f'data.dataset="{tmp_path / "nowhere"}"', "train.threads=1"])
    with pytest.raises(MoekitError, match="nowhere"):
        train_run(cfg, tmp_path / "run", log=_silent)
    assert not (tmp_path / "run" / "summary.json").exists()


def test_compare_on_vit_configs_reports_accuracy(tmp_path):
    """`moekit compare` on image classifiers: the accuracy columns are the seeds' summaries, and the accuracy plot
    is written beside the loss plot."""
    import csv

    from moekit.lab.training.compare import compare

    overrides = DIGITS + ["train.max_steps=4", "train.batch_size=16", "train.eval_every=2", "train.warmup_steps=1"]
    overrides += ["train.progress=off", "train.threads=1"]
    sources = [str(CONFIGS / "vit-dense.toml"), str(CONFIGS / "vit-softmoe.toml")]
    res = compare(sources, seeds=2, overrides=overrides, out_dir=tmp_path / "out", log=_silent)
    assert res.baseline == "vit-dense" and len(res.trained) == 4
    rows = {r["config"]: r for r in csv.DictReader((tmp_path / "out" / "compare.csv").open())}
    accs = [json.loads((tmp_path / "out" / "vit-softmoe" / f"seed{s}" / "summary.json").read_text())[
        "final_val_accuracy"] for s in (0, 1)]
    assert float(rows["vit-softmoe"]["final_val_accuracy_mean"]) == pytest.approx(sum(accs) / 2)
    assert float(rows["vit-softmoe"]["drop_fraction"]) == 0.0  # Soft MoE drops nothing
    png = tmp_path / "out" / "val_accuracy.png"
    assert png in res.files and png.read_bytes()[:4] == b"\x89PNG"
