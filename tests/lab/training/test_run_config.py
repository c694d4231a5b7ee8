"""Run configs: strict keys with "did you mean", values named with their rule, --set parsing, TOML round trip,
and the named configs in configs/."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import tomllib

from moekit.errors import ConfigError, MoekitError
from moekit.lab.training.run_config import build_run_config, load_run_config, parse_overrides, to_toml
from moekit.models import flop_matched_dense, parameter_counts

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def _lm(name: str, vocab_size: int):
    """The typed [model] of configs/<name>.toml with a tokenizer of ``vocab_size``."""
    return dataclasses.replace(load_run_config(CONFIGS / f"{name}.toml").model, vocab_size=vocab_size)


def test_builtin_default_is_switch_tiny():
    default = load_run_config(None).resolved()
    assert default == load_run_config(CONFIGS / "switch-tiny.toml").resolved()
    moe = default["moe"]
    assert (
        moe["num_experts"],
        moe["top_k"],
        moe["capacity_factor"],
        moe["jitter_eps"],
        moe["init_scale"],
    ) == (8, 1, 1.25, 0.01, 0.1)
    assert (default["model"]["moe_every"], default["model"]["load_balance_coef"]) == (2, 0.01)


@pytest.mark.parametrize("name", ["switch-tiny", "glam-tiny", "stmoe-tiny", "dense-tiny"])
def test_named_configs_validate_and_round_trip_through_toml(name):
    cfg = load_run_config(CONFIGS / f"{name}.toml")
    again = build_run_config(tomllib.loads(to_toml(cfg.resolved())))
    assert again.resolved() == cfg.resolved()
    assert again == cfg  # the typed config itself, [moe] inside [model]


def test_named_config_layouts():
    glam = _lm("glam-tiny", 4096)
    stmoe = load_run_config(CONFIGS / "stmoe-tiny.toml")
    st_lm = _lm("stmoe-tiny", 4096)
    assert glam.moe.top_k == 2 and glam.moe_layers() == [1, 3]
    assert st_lm.moe.top_k == 2 and st_lm.moe_layers() == [3] and st_lm.z_loss_coef == 1e-3
    assert stmoe.train.optimizer == "adafactor" and stmoe.train.update_clip_d == 1.0
    # dense-tiny is the FLOP-matched dense model of switch-tiny
    switch = _lm("switch-tiny", 4096)
    dense = _lm("dense-tiny", 4096)
    matched = flop_matched_dense(switch)
    assert parameter_counts(dense) == parameter_counts(matched)
    assert dataclasses.replace(dense, z_loss_coef=0.0) == dataclasses.replace(matched, z_loss_coef=0.0)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.max_step=3"], r"unknown config key 'train.max_step' \(did you mean 'max_steps'\?\)"),
        (["model.d_modle=64"], r"unknown config key 'model.d_modle' \(did you mean 'd_model'\?\)"),
        (["moe.num_expert=4"], r"unknown config key 'moe.num_expert' \(did you mean 'num_experts'\?\)"),
        (["model.vocab_size=100"], r"set by the tokenizer: use data.vocab_size"),
        (["trian.seed=1"], r"unknown section 'trian' \(did you mean 'train'\?\)"),
        (["train.lr=-1"], r"train.lr must be a number > 0.0, got -1"),
        (["train.optimizer='sgd'"], r"train.optimizer must be one of \('adamw', 'adafactor'\), got 'sgd'"),
        (["train.max_steps=2.5"], r"train.max_steps must be an integer >= 1, got 2.5"),
        (["moe.top_k=9"], r"top_k must be <= num_experts=8"),
        (["moe.router='expert_choice'"], r"expert choice routing looks across the whole sequence"),
        (["model.max_seq_len=64"], r"data.seq_len \(128\) must be <= model.max_seq_len \(64\)"),
        (["parallel.expert_parallel=3"], r"parallel.expert_parallel = 3 must divide moe.num_experts = 8"),
        (["parallel.expert_parallel=0"], r"parallel.expert_parallel must be an integer >= 1, got 0"),
        (["parallel.timeout_s=0"], r"parallel.timeout_s must be a number > 0, got 0"),
        (["parallel.expert_parallel=2", "train.batch_size=3"], r"train.batch_size = 3 \(the global batch\) must be"),
        (["train.scale_parameter=true"], r"train.scale_parameter = true is an Adafactor setting: it needs train"),
        (["train.relative_step=true"], r"train.relative_step = true is an Adafactor setting"),
        (["parallel.fsdp=true"], r"parallel.fsdp = true shards weights over the processes of a run: it needs"),
        (["parallel.fsdp=1"], r"parallel.fsdp must be true or false"),
        (["parallel.data_parallel=2", "parallel.fsdp=true", "train.optimizer='adafactor'"],
         r"parallel.fsdp = true needs train.optimizer = 'adamw', not 'adafactor'"),
        (["train.max_steps"], r"--set expects section.key=value"),
    ],
)
def test_config_errors_are_clear(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_run_config(None, overrides)


def test_unknown_section_in_a_file_and_bad_toml(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[modle]\nd_model = 64\n")
    with pytest.raises(ValueError, match=r"unknown config section \[modle\] \(did you mean 'model'\?\)"):
        load_run_config(bad)
    bad.write_text("[model\n")
    with pytest.raises(MoekitError, match="not valid TOML"):
        load_run_config(bad)
    with pytest.raises(MoekitError, match="not found"):
        load_run_config(tmp_path / "missing.toml")


def test_set_parses_toml_values_and_none_means_dropless():
    assert parse_overrides(["train.lr=1e-3", "data.corpus=sotu", "train.tensorboard=true", "moe.top_k=2"]) == {
        "train": {"lr": 1e-3, "tensorboard": True},
        "data": {"corpus": "sotu"},
        "moe": {"top_k": 2},
    }
    cfg = load_run_config(None, ["moe.capacity_factor=none"])
    assert cfg.moe.capacity_factor is None
    assert 'capacity_factor = "none"' in to_toml(cfg.resolved())


@pytest.mark.parametrize("path", sorted(CONFIGS.rglob("*.toml")), ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_shipped_config_validates_and_round_trips(path):
    cfg = load_run_config(path)
    again = build_run_config(tomllib.loads(to_toml(cfg.resolved())))
    assert again.resolved() == cfg.resolved()
    assert again == cfg


@pytest.mark.parametrize(
    "dense, moe",
    [("repro/switch-dense", f"repro/switch-e{e}") for e in (2, 4, 8, 16, 32)]
    + [("repro/glam-dense", "repro/glam-every2"), ("repro/glam-dense-every4", "repro/glam-every4")],
)
def test_reproduction_dense_baselines_are_flop_matched(dense, moe):
    vocab = 2048
    d = _lm(dense, vocab)
    m = _lm(moe, vocab)
    matched = flop_matched_dense(m)
    assert parameter_counts(d) == parameter_counts(matched)
    assert dataclasses.replace(d, z_loss_coef=0.0, load_balance_coef=0.0) == dataclasses.replace(
        matched, z_loss_coef=0.0, load_balance_coef=0.0
    )


def test_config_is_parsed_once_into_typed_sections():
    from moekit.layers.config import MoEConfig, SoftMoEConfig
    from moekit.models.config import LMConfig
    from moekit.models.vit import ViTConfig

    lm = load_run_config(None, ["data.seq_len=64"])
    assert isinstance(lm.model, LMConfig) and isinstance(lm.moe, MoEConfig) and lm.moe is lm.model.moe
    # max_seq_len follows data.seq_len unless set; vocab_size is data.vocab_size (the tokenizer's target)
    assert (lm.model.max_seq_len, lm.model.vocab_size, lm.arch) == (64, 4096, "lm")
    assert "vocab_size" not in lm.resolved()["model"] and "arch" not in lm.resolved()["model"]
    vit = load_run_config(CONFIGS / "vit-softmoe.toml")
    assert isinstance(vit.model, ViTConfig) and isinstance(vit.moe, SoftMoEConfig) and vit.arch == "vit"
    assert vit.resolved()["model"]["arch"] == "vit" and vit.resolved()["moe"]["router"] == "soft"
    dense = load_run_config(CONFIGS / "dense-tiny.toml")
    assert dense.moe is None and "moe" not in dense.resolved()


# ---------------------------------------------------------------------------------------------------------------
# nonsense is refused (issue 18), every problem of a file at once


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.tensorboard='false'", "train.tensorboard must be true or false, got 'false'"),
        ("moe.normalize_gates=3", "moe.normalize_gates must be true, false or none, got 3"),
        ("moe.normalize_gates='false'", "moe.normalize_gates must be true, false or none, got 'false'"),
        ("moe.noisy_gating='false'", "moe.noisy_gating must be true or false, got 'false'"),
        ("moe.min_capacity=true", "moe.min_capacity must be an integer >= 0, got True"),
        ("model.moe_offset=true", "model.moe_offset must be an integer in [0, moe_every=2), got True"),
        ("train.lr=inf", "train.lr must be a finite number > 0.0, got inf"),
        ("train.weight_decay=inf", "train.weight_decay must be a finite number >= 0.0, got inf"),
        ("moe.init_scale=inf", "moe.init_scale must be finite and > 0, got inf"),
        ("model.init_scale=inf", "model.init_scale must be a finite number > 0, got inf"),
        ("model.norm_eps=inf", "model.norm_eps must be a finite number > 0, got inf"),
        ("model.rope_base=inf", "model.rope_base must be a finite number > 0, got inf"),
        ("moe.second_expert_threshold='x'", "moe.second_expert_threshold must be > 0, got 'x'"),
        ("parallel.timeout_s=inf", "parallel.timeout_s must be a finite number > 0, got inf"),
        ("train.threads=100000", "train.threads must be an integer in [0, 1024], got 100000"),
        ("train.seed=9223372036854775808", "train.seed must be an integer in [0, 2**63 - 1], got 9223372036854775808"),
        ("data.cache_dir=3", 'data.cache_dir must be a directory path or "none", got 3'),
        (f"moe.capacity_factor={10**400}", f"moe.capacity_factor must be finite (None for dropless), got {10**400}"),
        # within 64 bits, but the layout checks loop over the blocks: once a hang, now a bound
        ("model.n_layers=1099511627776",
         "model.n_layers must be <= 100,000 (MAX_LAYERS, beyond any trainable depth), got 1099511627776"),
        ("data.seq_len=4611686018427387904",
         "data.seq_len must be <= 1,048,576 (MAX_SEQ_LEN, about a million tokens), got 4611686018427387904"),
    ],
)
def test_nonsense_values_are_refused_naming_the_key(override, message):
    with pytest.raises(ConfigError) as info:
        load_run_config(None, [override])
    assert str(info.value) == message


def test_largest_seed_and_thread_count_are_accepted():
    cfg = load_run_config(None, [f"train.seed={2**63 - 1}", "train.threads=1024"])
    assert (cfg.train.seed, cfg.train.threads) == (2**63 - 1, 1024)


def test_an_empty_moe_section_is_an_error_not_a_dense_model(tmp_path):
    path = tmp_path / "empty-moe.toml"
    path.write_text("[model]\nd_model = 64\n\n[moe]\n")
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    assert str(info.value) == "[moe] is empty: remove the section for a dense model, or set moe.num_experts"
    path.write_text("[model]\nd_model = 64\n")  # no section: dense, as documented
    assert load_run_config(path).moe is None


def test_every_problem_of_a_file_is_reported_at_once(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(
        "[model]\nd_model = 64\nn_layer = 2\n\n"
        "[moe]\nnum_experts = 4\ntop_k = 0\n\n"
        "[train]\nlr = inf\ntensorboard = \"false\"\n"
    )
    with pytest.raises(ConfigError) as info:
        load_run_config(path)
    lines = str(info.value).splitlines()
    assert lines[0] == "4 problems in the config:"
    assert lines[1].startswith("  unknown config key 'model.n_layer' (did you mean 'n_layers'?)")
    assert lines[2:] == [
        "  moe.top_k must be a positive integer, got 0",
        "  train.lr must be a finite number > 0.0, got inf",
        "  train.tensorboard must be true or false, got 'false'",
    ]


def test_a_broken_moe_section_does_not_hide_model_problems():
    tables = {"model": {"d_model": "wide", "n_heads": 0}, "moe": {"num_experts": 8, "jitter_eps": 2}}
    with pytest.raises(ConfigError) as info:
        build_run_config(tables)
    # moe.d_model inherits the model's bad value: reported once, as the model's
    assert info.value.problems == [
        "model.d_model must be a positive integer, got 'wide'",
        "model.n_heads must be a positive integer, got 0",
        "moe.jitter_eps must be in [0, 1), got 2",
    ]


def test_a_refused_data_value_does_not_report_its_consequences():
    # data.dataset is refused, so the model is checked against the default set (digits, 8x8): the 28x28 model
    # would "mismatch" it, which is the default's doing, not the file's.
    tables = {"model": {"arch": "vit", "image_size": 28}, "data": {"dataset": 5}}
    with pytest.raises(ConfigError) as info:
        build_run_config(tables)
    assert info.value.problems == ["data.dataset must be 'digits', 'fashion_mnist' or a directory, got 5"]


def test_a_moe_section_the_task_refuses_is_reported_with_the_model_problems():
    # The task's refusal (Soft MoE in a causal model) comes first, not the Soft MoE keys it would not take.
    with pytest.raises(ConfigError) as info:
        load_run_config(None, ['moe.router="soft"', "model.n_heads=0"])
    assert len(info.value.problems) == 2
    assert info.value.problems[0] == "model.n_heads must be a positive integer, got 0"
    assert info.value.problems[1].startswith("moe.router = 'soft': Soft MoE mixes every token")
    assert "refused in the causal TransformerLM" in info.value.problems[1]


def test_parallel_layout_for_a_launch():
    """The [parallel] layout a resume takes: the saved one when it fits the launch, else the saved data_parallel
    with the rest on the 8 experts, else every process on the experts, else on data; a given degree is kept and
    the other follows from the number of processes. The global batch must split evenly over all processes."""
    from moekit.lab.training.run_config import layout_for_launch

    cfg = load_run_config(str(CONFIGS / "switch-tiny.toml"), ["parallel.data_parallel=2", "parallel.expert_parallel=2"])
    assert cfg.moe.num_experts == 8 and cfg.parallel.world == 4

    def layout(world: int, **given) -> tuple[int, int]:
        p = layout_for_launch(cfg, world, **given)
        return p.data_parallel, p.expert_parallel

    assert layout(4) == (2, 2)  # fits: kept
    assert layout(8) == (2, 4)  # saved dp 2, 4 ranks hold 8 experts
    assert layout(2) == (2, 1)  # dp 2 fits, ep 1
    assert layout(6) == (6, 1)  # neither 6 nor 3 divides 8 experts: all data parallel
    assert layout(1) == (1, 1)
    assert layout(4, data_parallel=1) == (1, 4)
    assert layout(4, expert_parallel=1) == (4, 1)
    with pytest.raises(ConfigError, match="parallel.expert_parallel = 3 does not divide the 4 processes"):
        layout(4, expert_parallel=3)
    dense = load_run_config(str(CONFIGS / "dense-tiny.toml"))
    assert layout_for_launch(dense, 4).data_parallel == 4
    # FSDP is kept at any layout of several processes, and dropped on one (nothing to shard over).
    sharded = load_run_config(str(CONFIGS / "switch-tiny.toml"), ["parallel.data_parallel=2", "parallel.fsdp=true"])
    assert layout_for_launch(sharded, 4).fsdp is True and layout_for_launch(sharded, 1).fsdp is False
    with pytest.raises(ConfigError, match="must be a multiple of parallel.data_parallel x expert_parallel = 3"):
        load_run_config(str(CONFIGS / "dense-tiny.toml"), ["parallel.data_parallel=3"])
