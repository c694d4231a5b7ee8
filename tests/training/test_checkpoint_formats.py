"""One process reads sharded checkpoints through the single-file API (verify_checkpoint, load_checkpoint,
latest_valid_checkpoint, unhealthy_reason), and sharded checkpoints keep the single-file guarantees: the health flag,
pruning that keeps the newest healthy checkpoint (across both formats), and a full disk mid-write as one line with
no partial directory.

The sharded checkpoints here are written by one process (``save_sharded`` with no process group): the same files,
one shard, as a mesh writes with more; tests/distributed/test_mesh_checkpoint.py writes them on 4 ranks.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from tests.distributed._checkpoints import full_disk

from moekit import MoEConfig
from moekit.errors import MoekitError
from moekit.models import LMConfig, TransformerLM
from moekit.training import checkpoint as ckpt
from moekit.training.sharded_checkpoint import save_sharded

VOCAB, SEQ = 32, 8


def _model() -> TransformerLM:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, group_size=SEQ, jitter_eps=0.0)
    return TransformerLM(LMConfig(vocab_size=VOCAB, d_model=16, n_layers=2, n_heads=2, d_ff=32, max_seq_len=SEQ,
                                  moe=moe, moe_every=2, moe_offset=1))


def _trained() -> tuple[TransformerLM, torch.optim.AdamW]:
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens_BT = torch.randint(0, VOCAB, (4, SEQ + 1), generator=torch.Generator().manual_seed(1))
    model(tokens_BT[:, :-1], tokens_BT[:, 1:]).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def _flip_byte(path: Path) -> None:
    """Flip one byte of the tensor data (past the header): still a valid safetensors file, with wrong contents."""
    raw = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[header + (len(raw) - header) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_one_process_reads_a_sharded_checkpoint_through_the_single_file_api(tmp_path):
    model, optimizer = _trained()
    path = save_sharded(tmp_path, 5, model, optimizer, None, {"note": "sharded", "data": {"pos": 7}})
    assert not (path / "model.safetensors").exists() and list(path.glob("*.safetensors"))

    data = ckpt.verify_checkpoint(path)
    assert data.sharded and set(data) == {"state.json"} and json.loads(data["state.json"])["note"] == "sharded"
    fresh = _model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1.0)
    state = ckpt.load_checkpoint(data, fresh, fresh_opt)
    assert state["step"] == 5 and state["data"] == {"pos": 7}
    for name, want in model.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], want), name
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert all(torch.equal(optimizer.state[p][k], fresh_opt.state[q][k]) for k in optimizer.state[p])
    assert fresh_opt.param_groups[0]["lr"] == 1e-2
    # What `moekit eval / generate / export-hf` call (load_trained_run): the newest valid checkpoint, then load.
    found_path, found = ckpt.latest_valid_checkpoint(tmp_path)
    assert found_path == path and found.sharded
    assert ckpt.unhealthy_reason(path, found) is None


def test_a_corrupted_sharded_checkpoint_falls_back_to_the_previous_one(tmp_path):
    model, optimizer = _trained()
    older = save_sharded(tmp_path, 1, model, optimizer, None, {})
    newest = save_sharded(tmp_path, 2, model, optimizer, None, {})
    shard = sorted(newest.glob("*.safetensors"))[0]
    _flip_byte(shard)
    with pytest.raises(ckpt.CheckpointError, match=rf"checkpoint file .*{shard.name} fails its sha256"):
        ckpt.verify_checkpoint(newest)
    reports: list[str] = []
    path, data = ckpt.latest_valid_checkpoint(tmp_path, report=reports.append)
    assert path == older and data.sharded
    assert len(reports) == 1 and shard.name in reports[0] and "trying the previous checkpoint" in reports[0]


def test_sharded_health_flag_and_pruning_keep_the_newest_healthy_one_across_formats(tmp_path):
    model, optimizer = _trained()
    # Step 1: a healthy single-file checkpoint (a run started on one process); then a mesh's sharded ones, all
    # unhealthy: non-finite weights (2, 3), a non-finite validation loss the caller reports (4).
    ckpt.save_checkpoint(tmp_path, 1, model, optimizer, {}, keep=2)
    with torch.no_grad():
        model.embed.weight[0, 0] = float("nan")
    for step in (2, 3):
        save_sharded(tmp_path, step, model, optimizer, None, {}, keep=2)
    with torch.no_grad():
        model.embed.weight[0, 0] = 0.0
    save_sharded(tmp_path, 4, model, optimizer, None, {}, keep=2, unhealthy="validation loss nan at step 4")
    # The newest two are unhealthy: the newest healthy one (the single-file step 1) stays, step 2 goes.
    found = ckpt.list_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step_00000004", "step_00000003", "step_00000001"]
    reasons = [ckpt.unhealthy_reason(p, ckpt.verify_checkpoint(p)) for p in found]
    assert reasons == ["validation loss nan at step 4", "non-finite weights", None]
    # A sharded manifest without the flag is judged by its weights, as a single-file one is.
    save_sharded(tmp_path, 5, model, optimizer, None, {})
    for step, want in ((3, "non-finite weights"), (5, None)):
        path = tmp_path / f"step_{step:08d}"
        manifest = json.loads((path / "manifest.json").read_text())
        del manifest["healthy"]
        (path / "manifest.json").write_text(json.dumps(manifest))
        assert ckpt.unhealthy_reason(path, ckpt.verify_checkpoint(path)) == want


def test_a_full_disk_during_a_sharded_write_is_one_line_and_leaves_no_partial_directory(tmp_path):
    model, optimizer = _trained()
    save_sharded(tmp_path, 1, model, optimizer, None, {}, keep=3)
    with full_disk(), pytest.raises(ckpt.CheckpointSpaceError) as info:
        save_sharded(tmp_path, 2, model, optimizer, None, {}, keep=3)
    message = str(info.value)
    assert isinstance(info.value, MoekitError) and "\n" not in message
    assert str(tmp_path / "step_00000002") in message and "no space left on the device" in message
    assert "the earlier ones are intact" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000001"]  # no temporary, no step 2
    assert ckpt.verify_checkpoint(tmp_path / "step_00000001").sharded
