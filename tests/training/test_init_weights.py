"""Initial weights (``save_initial_weights`` / ``load_initial_weights``) and ``train.init_from``: written atomically
with a manifest, verified and loaded strictly, one-line errors naming the file; a trainer at step 0 with no
checkpoint starts from them, with a fresh optimizer."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from moekit.data.batches import TokenBatches
from moekit.errors import ConfigError
from moekit.models import TransformerLM
from moekit.models.config import LMConfig
from moekit.training import TrainConfig
from moekit.training import checkpoint as ckpt
from moekit.training.trainer import Trainer

CFG = LMConfig(vocab_size=50, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=8)


def _model(seed: int) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(CFG)


def test_round_trip_and_layout(tmp_path):
    src = _model(0)
    path = ckpt.save_initial_weights(tmp_path, src)
    assert path == tmp_path / "init" / "model.safetensors" == tmp_path / ckpt.INIT_WEIGHTS
    manifest = json.loads((tmp_path / "init" / "manifest.json").read_text())
    assert manifest["files"]["model.safetensors"]["bytes"] == path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["init"]  # no temporary left behind
    dst = _model(1)
    assert not torch.equal(dst.embed.weight, src.embed.weight)
    ckpt.load_initial_weights(path, dst)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values(), strict=True))
    # Writing again replaces the directory as a whole.
    ckpt.save_initial_weights(tmp_path, dst)
    assert sorted(p.name for p in (tmp_path / "init").iterdir()) == ["manifest.json", "model.safetensors"]


@pytest.mark.parametrize("damage,match", [
    ("flip", "fail their sha256 checksum"),
    ("truncate", "fail their sha256 checksum"),
    ("no_manifest", "manifest .* is missing"),
    ("no_weights", "are missing"),
    ("bad_manifest", "unreadable"),
])
def test_damaged_weights_are_one_line_errors_naming_the_file(tmp_path, damage, match):
    path = ckpt.save_initial_weights(tmp_path, _model(0))
    manifest = tmp_path / "init" / "manifest.json"
    if damage == "flip":
        raw = bytearray(path.read_bytes())
        raw[len(raw) // 2] ^= 1
        path.write_bytes(bytes(raw))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:-10])
    elif damage == "no_manifest":
        manifest.unlink()
    elif damage == "no_weights":
        path.unlink()
    else:
        manifest.write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=match) as info:
        ckpt.load_initial_weights(path, _model(1))
    assert "\n" not in str(info.value) and str(path) in str(info.value)


def test_weights_of_another_model_are_refused(tmp_path):
    path = ckpt.save_initial_weights(tmp_path, _model(0))
    other = TransformerLM(LMConfig(vocab_size=50, d_model=16, n_layers=3, n_heads=2, d_ff=32, max_seq_len=8))
    with pytest.raises(ckpt.CheckpointError, match="do not match the model") as info:
        ckpt.load_initial_weights(path, other)
    assert "\n" not in str(info.value)


def test_init_from_config_values():
    assert TrainConfig().init_from is None
    assert TrainConfig(init_from="init/model.safetensors").init_from == "init/model.safetensors"
    for bad in ("", "  ", 3):
        with pytest.raises(ConfigError, match="train.init_from"):
            TrainConfig(init_from=bad)


def _trainer(run_dir, model, **train) -> Trainer:
    tokens = np.random.default_rng(0).integers(0, 50, 2000).astype(np.int64)
    cfg = TrainConfig(max_steps=3, batch_size=2, log_every=1, eval_every=0, checkpoint_every=0, warmup_steps=1,
                      progress="off", **train)
    return Trainer(cfg, model, TokenBatches(tokens, 2, 8, 0), tokens[:200], run_dir, log=lambda m: None)


def test_trainer_starts_from_init_weights(tmp_path):
    src = _model(0)
    ckpt.save_initial_weights(tmp_path, src)
    model = _model(1)
    trainer = _trainer(tmp_path, model, init_from="init/model.safetensors")
    trainer.fit()
    # The step-0 checkpoint holds the initial weights (so a roll-back returns to them), not model 1's random init.
    step0 = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    assert step0.name == "step_00000000"
    fresh = _model(2)
    ckpt.load_checkpoint(ckpt.verify_checkpoint(step0), fresh)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), fresh.state_dict().values(), strict=True))
    # The same training from the given weights as a trainer built on a copy of them with no init_from.
    twin_dir = tmp_path / "twin"
    twin = _model(0)
    _trainer(twin_dir, twin).fit()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values(), strict=True))


def test_init_from_is_ignored_once_a_checkpoint_exists(tmp_path):
    ckpt.save_initial_weights(tmp_path, _model(0))
    first = _trainer(tmp_path, _model(1), init_from="init/model.safetensors")
    first.fit()
    trained = {k: v.clone() for k, v in first.model.state_dict().items()}
    # Damage the initial weights: a resume from the checkpoint must not read them.
    (tmp_path / "init" / "model.safetensors").write_bytes(b"garbage")
    again = _trainer(tmp_path, _model(3), init_from="init/model.safetensors", )
    assert again.resume()
    assert all(torch.equal(trained[k], v) for k, v in again.model.state_dict().items())
    again.fit()  # already at max_steps: nothing to do, and no error


def test_missing_init_weights_fail_before_training(tmp_path):
    trainer = _trainer(tmp_path, _model(1), init_from="init/model.safetensors")
    with pytest.raises(ckpt.CheckpointError, match="missing"):
        trainer.fit()
    assert not ckpt.list_checkpoints(tmp_path / "checkpoints")
