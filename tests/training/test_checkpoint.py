"""Checkpoints: exact round trip (no pickle), corruption and partial writes detected, keep-last-K."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moekit.training import checkpoint as ckpt
from moekit.training.adafactor import Adafactor


def _model_and_opt(kind: str = "adamw"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2) if kind == "adamw" else Adafactor(model.parameters(), 1e-2)
    for _ in range(2):
        model(torch.randn(5, 4)).pow(2).sum().backward()
        opt.step()
        opt.zero_grad(set_to_none=False)
    return model, opt


@pytest.mark.parametrize("kind", ["adamw", "adafactor"])
def test_round_trip_is_exact(tmp_path, kind):
    model, opt = _model_and_opt(kind)
    rng_before = torch.get_rng_state()
    path = ckpt.save_checkpoint(
        tmp_path, 7, model, opt, {"data": {"epoch": 1, "index": 3}, "rng": ckpt.rng_state()}, keep=3
    )
    assert sorted(p.name for p in path.iterdir()) == [
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "state.json",
    ]
    torch.rand(10)  # move the generator on
    model2, opt2 = _model_and_opt(kind)
    with torch.no_grad():
        for p in model2.parameters():
            p.add_(1.0)
    state = ckpt.load_checkpoint(ckpt.verify_checkpoint(path), model2, opt2)
    ckpt.set_rng_state(state["rng"])
    assert torch.equal(torch.get_rng_state(), rng_before)
    assert state["step"] == 7 and state["data"] == {"epoch": 1, "index": 3}
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    for i in s1:
        for k in s1[i]:
            assert torch.equal(torch.as_tensor(s1[i][k]), torch.as_tensor(s2[i][k])), (i, k)


def test_flipped_byte_is_detected_named_and_the_previous_checkpoint_used(tmp_path):
    model, opt = _model_and_opt()
    for step in (1, 2, 3):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {}, keep=3)
    target = tmp_path / "step_00000003" / "optimizer.safetensors"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    target.write_bytes(bytes(raw))
    reports: list[str] = []
    path, _ = ckpt.latest_valid_checkpoint(tmp_path, report=reports.append)
    assert path.name == "step_00000002"
    assert len(reports) == 1 and str(target) in reports[0] and "sha256" in reports[0]
    with pytest.raises(ckpt.CheckpointError, match="optimizer.safetensors fails its sha256"):
        ckpt.verify_checkpoint(tmp_path / "step_00000003")


def test_partial_checkpoints_are_ignored_and_cleaned(tmp_path):
    model, opt = _model_and_opt()
    ckpt.save_checkpoint(tmp_path, 1, model, opt, {}, keep=3)
    # a killed writer leaves a temp dir; a step dir without its manifest is incomplete
    (tmp_path / ".tmp-step_00000002-123").mkdir()
    incomplete = tmp_path / "step_00000003"
    incomplete.mkdir()
    (incomplete / "model.safetensors").write_bytes(b"partial")
    reports: list[str] = []
    path, _ = ckpt.latest_valid_checkpoint(tmp_path, report=reports.append)
    assert path.name == "step_00000001" and "manifest.json is missing" in reports[0]
    assert [p.name for p in ckpt.clean_partial(tmp_path)] == [".tmp-step_00000002-123"]


def test_keep_last_k_and_json_state(tmp_path):
    model, opt = _model_and_opt()
    for step in range(1, 6):
        ckpt.save_checkpoint(tmp_path, step, model, opt, {"note": "x"}, keep=2)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["step_00000005", "step_00000004"]
    state = json.loads((tmp_path / "step_00000005" / "state.json").read_text())
    assert state["note"] == "x" and state["optimizer"]["param_groups"][0]["lr"] == 1e-2


def test_training_code_never_unpickles():
    src = Path(ckpt.__file__).parent
    for f in list(src.glob("*.py")) + list((src.parent / "models").glob("*.py")):
        text = f.read_text()
        assert (
            "torch.load(" not in text
            and "torch.save(" not in text
            and "pickle" not in text.replace("never pickle", "").replace("Never pickle", "")
        ), f
