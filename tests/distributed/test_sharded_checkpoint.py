"""Sharded checkpoints (torch.distributed.checkpoint, safetensors) written on a (dp 2, ep 2) mesh of 4 gloo ranks.

One spawn of 4 ranks does the distributed work and leaves its evidence in files; the tests below assert on them:

- every rank writes only its own chunks: an expert bank's rows come from the ranks that hold them (E / ep rows per
  file, at their offset), every chunk exactly once, and the checkpoint is safetensors + JSON (no pickle anywhere);
- the checkpoint loads at (dp 1, ep 4), (dp 4, ep 1) and on one process without a process group: model weights and
  AdamW state equal, exactly, the single-process layout of what was saved;
- a failure on one rank mid-save raises CheckpointError on every rank and leaves no directory; keep = 1 prunes;
- a flipped byte in a shard is refused by name (on 4 ranks and on one process); a temporary without a manifest is
  not listed as a checkpoint.

The state saved is "trained": each rank takes the same two AdamW steps on the full model (one thread, so the ranks
agree bit for bit), then slices its experts and their optimizer state as a run at (2, 2) holds them.
"""

from __future__ import annotations

import importlib
import json
import pickle
import shutil
import struct
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moekit import MoEConfig
from moekit.layers.expert_parallel import expert_parameters
from moekit.models import LMConfig, TransformerLM
from moekit.training import sharded_checkpoint
from moekit.training.checkpoint import CheckpointError, clean_partial, list_checkpoints
from moekit.training.distributed import ExpertParallel, init_parallel_mesh
from moekit.training.sharded_checkpoint import load_sharded, save_sharded
from tests.distributed._launch import spawn

SEQ, BATCH, VOCAB, E = 16, 8, 64, 4
STEP = 6
LAYOUTS = [(1, 4), (4, 1)]  # (dp, ep) the (2, 2) checkpoint is loaded at


def _model() -> TransformerLM:
    torch.manual_seed(0)
    moe = MoEConfig(d_model=32, d_ff=64, num_experts=E, top_k=2, capacity_factor=1.0, group_size=SEQ,
                    jitter_eps=0.0)
    cfg = LMConfig(vocab_size=VOCAB, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=SEQ, moe=moe,
                   moe_every=2, moe_offset=1)
    return TransformerLM(cfg)


def _trained() -> tuple[TransformerLM, torch.optim.AdamW]:
    """The tiny LM after two AdamW steps (every expert receives tokens, so every moment is non-zero)."""
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    tokens_BT = torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        model(tokens_BT[:, :-1], tokens_BT[:, 1:]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, optimizer


def _fresh() -> tuple[TransformerLM, torch.optim.AdamW]:
    """What a resumed run builds before loading: initial weights, an optimizer without state (other lr)."""
    model = _model()
    return model, torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.0)


def _flat_state(model: TransformerLM, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Weights and optimizer tensors as this process holds them, under the checkpoint's names."""
    out = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for name, p in model.named_parameters():
        for key, value in optimizer.state.get(p, {}).items():
            out[f"optim/{name}/{key}"] = value.detach().clone()
    return out


def _expert_names() -> set[str]:
    model = _model()
    ids = {id(p) for p in expert_parameters(model)}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def _flip_byte(path: Path) -> None:
    """Flip one byte in the tensor data (past the header), keeping the file a valid safetensors file."""
    raw = bytearray(path.read_bytes())
    header = 8 + struct.unpack("<Q", raw[:8])[0]
    raw[header + (len(raw) - header) // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _worker(rank: int, world: int, root: str, out: str) -> None:
    root_p, out_p = Path(root), Path(out)
    report: dict = {}
    mesh = init_parallel_mesh(2, 2, timeout_s=60)
    model, optimizer = _trained()
    full = _flat_state(model, optimizer)
    save_file({k: v.contiguous() for k, v in full.items()}, str(out_p / f"before_rank{rank}.safetensors"))
    parallel = ExpertParallel.from_mesh(model, mesh)
    parallel.shard(optimizer)

    # A failure on one rank (rank 1 cannot hash its shard) fails the save on every rank and commits nothing.
    real_digest = sharded_checkpoint._file_digest
    if rank == 1:
        def broken(path: Path) -> tuple[str, int]:
            raise OSError(5, "simulated read error", str(path))
        sharded_checkpoint._file_digest = broken
    try:
        save_sharded(root_p, 3, model, optimizer, parallel, {"note": "fails"})
    except CheckpointError as exc:
        report["failed_save"] = str(exc)
    sharded_checkpoint._file_digest = real_digest

    # An older checkpoint, then the one the tests read: keep = 1 prunes the older one.
    save_sharded(root_p, 4, model, optimizer, parallel, {"note": "older"})
    parallel.barrier()
    start = time.perf_counter()
    path = save_sharded(root_p, STEP, model, optimizer, parallel, {"note": "mesh 2x2", "step_seen": STEP}, keep=1)
    report["save_s"] = time.perf_counter() - start

    for dp, ep in LAYOUTS:
        mesh_b = init_parallel_mesh(dp, ep, timeout_s=60)
        model_b, optimizer_b = _fresh()
        parallel_b = ExpertParallel.from_mesh(model_b, mesh_b)
        parallel_b.shard(optimizer_b)
        start = time.perf_counter()
        state = load_sharded(path, model_b, optimizer_b, parallel_b)
        report[f"load_{dp}x{ep}_s"] = time.perf_counter() - start
        report[f"state_{dp}x{ep}"] = {"note": state["note"], "step": state["step"],
                                     "lr": optimizer_b.param_groups[0]["lr"]}
        local = _flat_state(model_b, optimizer_b)
        save_file({k: v.contiguous() for k, v in local.items()}, str(out_p / f"{dp}x{ep}_rank{rank}.safetensors"))

    # A flipped byte in one shard: every rank refuses the checkpoint, naming the file.
    corrupt = root_p.parent / "corrupt" / path.name
    if rank == 0:
        shutil.copytree(path, corrupt)
        _flip_byte(corrupt / sorted(p.name for p in corrupt.glob("*.safetensors"))[-1])
    parallel.barrier()
    model_c, optimizer_c = _fresh()
    parallel_c = ExpertParallel.from_mesh(model_c, mesh)
    parallel_c.shard(optimizer_c)
    try:
        load_sharded(corrupt, model_c, optimizer_c, parallel_c)
    except CheckpointError as exc:
        report["corrupt_load"] = str(exc)
    (out_p / f"report_rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path]:
    """(the checkpoints' root, the workers' output directory) after the 4-rank run."""
    base = tmp_path_factory.mktemp("sharded")
    root, out = base / "checkpoints", base / "out"
    out.mkdir()
    spawn(_worker, 4, str(root), str(out))
    return root, out


def _reports(out: Path) -> list[dict]:
    return [json.loads((out / f"report_rank{r}.json").read_text()) for r in range(4)]


def _reference(out: Path) -> dict[str, torch.Tensor]:
    """The single-process layout of what was saved (rank 0's full state before it sliced its experts)."""
    return load_file(str(out / "before_rank0.safetensors"))


def _sliced(name: str, tensor: torch.Tensor, experts: set[str]) -> bool:
    """Whether a saved tensor is an expert bank (or its per-expert optimizer state), sliced over ep."""
    param = name.split("/")[1] if name.startswith("optim/") else name
    return param in experts and tensor.dim() >= 2 and tensor.shape[0] == E


def test_the_ranks_agree_on_the_state_they_save(saved):
    _, out = saved
    reference = _reference(out)
    assert any(k.startswith("optim/") and k.endswith("/exp_avg_sq") for k in reference)
    for rank in range(1, 4):
        other = load_file(str(out / f"before_rank{rank}.safetensors"))
        assert other.keys() == reference.keys()
        assert all(torch.equal(other[k], reference[k]) for k in reference), rank


def test_each_rank_writes_only_its_own_chunks_in_safetensors(saved):
    root, out = saved
    path = root / f"step_{STEP:08d}"
    manifest = json.loads((path / "manifest.json").read_text())
    names = sorted(p.name for p in path.iterdir())
    # No pickle: no DCP .metadata, every file is safetensors or moekit's JSON, and none starts with pickle's opcode.
    assert all(n.endswith(".safetensors") or n in ("manifest.json", "state.json") for n in names), names
    assert not any(n.endswith(".metadata") for n in names)
    assert all((path / n).read_bytes()[:1] != b"\x80" for n in names)
    assert set(manifest["files"]) == set(names) - {"manifest.json"}
    assert manifest["layout"] == {"world": 4, "dp": 2, "ep": 2}

    reference, experts = _reference(out), _expert_names()
    chunks: dict[str, list[tuple[int, ...]]] = {}
    shard_files = [n for n in names if n.endswith(".safetensors")]
    assert 2 <= len(shard_files) <= 4
    for name in shard_files:
        writer = manifest["files"][name]["rank"]
        ep_index = writer % 2  # rank = dp_index * ep + ep_index
        with safe_open(str(path / name), framework="pt") as f:
            offsets = json.loads(f.metadata()["DCP_SHARDING_INFO"])
            for key in f.keys():
                chunk = f.get_tensor(key)
                offset = tuple(offsets[key]["saved_offsets"])
                chunks.setdefault(key, []).append(offset)
                if _sliced(key, reference[key], experts):
                    # The writer's own experts only: E / ep rows at its ep index, never the whole bank.
                    assert chunk.shape[0] == E // 2 and offset[0] == ep_index * (E // 2), (name, key)
                    assert torch.equal(chunk, reference[key][offset[0]: offset[0] + E // 2])
                else:
                    assert offset == (0,) * chunk.dim() and torch.equal(chunk, reference[key]), (name, key)
    # Every tensor of the single-process layout is there, each chunk written once (replicas deduplicated).
    assert chunks.keys() == reference.keys()
    for key, found in chunks.items():
        expected = 2 if _sliced(key, reference[key], experts) else 1
        assert len(found) == len(set(found)) == expected, key


@pytest.mark.parametrize("dp,ep", LAYOUTS)
def test_the_2x2_checkpoint_loads_at_another_layout(saved, dp, ep):
    _, out = saved
    reference, experts = _reference(out), _expert_names()
    for rank in range(4):
        local = load_file(str(out / f"{dp}x{ep}_rank{rank}.safetensors"))
        assert local.keys() == reference.keys()
        first = (rank % ep) * (E // ep)
        for key, want in reference.items():
            if _sliced(key, want, experts):
                want = want[first: first + E // ep]
            assert torch.equal(local[key], want), (rank, key)
    for report in _reports(out):
        # The JSON state and the optimizer's hyper-parameters come back too (the fresh optimizer had lr 1.0).
        assert report[f"state_{dp}x{ep}"] == {"note": "mesh 2x2", "step": STEP, "lr": 1e-2}


def test_one_process_loads_the_shards_of_4_ranks_without_unpickling(saved, monkeypatch):
    root, out = saved
    assert not dist.is_initialized()

    def refuse(*args, **kwargs):
        raise AssertionError("a sharded checkpoint load unpickled something")

    # Built, and DCP imported, before the patch: imports (the optimizer's lazy one of torch._dynamo) use pickle.
    model, optimizer = _fresh()
    importlib.import_module("torch.distributed.checkpoint")
    # Every way DCP's file-system reader could unpickle (its .metadata, torch.load of a tensor) fails the test.
    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, refuse)
    monkeypatch.setattr(torch, "load", refuse)
    state = load_sharded(root / f"step_{STEP:08d}", model, optimizer, None)
    monkeypatch.undo()
    got, reference = _flat_state(model, optimizer), _reference(out)
    assert got.keys() == reference.keys()
    assert all(torch.equal(got[k], reference[k]) for k in reference)
    assert state["note"] == "mesh 2x2" and optimizer.param_groups[0]["lr"] == 1e-2
    # And it trains on from there: one more step changes the weights.
    before = model.embed.weight.detach().clone()
    tokens_BT = torch.randint(0, VOCAB, (2, SEQ + 1), generator=torch.Generator().manual_seed(2))
    model(tokens_BT[:, :-1], tokens_BT[:, 1:]).loss.backward()
    optimizer.step()
    assert not torch.equal(model.embed.weight, before)


def test_a_checkpoint_of_another_model_is_refused(saved):
    root, _ = saved
    model = _model()
    model.embed = torch.nn.Embedding(VOCAB + 1, 32)  # another vocabulary size
    with pytest.raises(CheckpointError, match=r"does not match the model: embed.weight is \[64, 32\]"):
        load_sharded(root / f"step_{STEP:08d}", model, None, None)


def test_a_failed_save_commits_nothing_and_keep_prunes(saved):
    root, out = saved
    for report in _reports(out):
        assert "cannot write checkpoint" in report["failed_save"] and "step_00000003" in report["failed_save"]
        assert "rank 1" in report["failed_save"] and "simulated read error" in report["failed_save"]
    assert [p.name for p in root.iterdir()] == [f"step_{STEP:08d}"]  # no step 3, no temporary, step 4 pruned


def test_a_corrupted_shard_is_refused_by_name(saved, tmp_path):
    root, out = saved
    for report in _reports(out):
        assert "fails its sha256 checksum" in report["corrupt_load"]
        assert "corrupt" in report["corrupt_load"] and ".safetensors" in report["corrupt_load"]
    # On one process too; the model is untouched by a refused load.
    copy = tmp_path / f"step_{STEP:08d}"
    shutil.copytree(root / copy.name, copy)
    shard = sorted(copy.glob("*.safetensors"))[0]
    _flip_byte(shard)
    model, optimizer = _fresh()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=rf"checkpoint file .*{shard.name} fails its sha256"):
        load_sharded(copy, model, optimizer, None)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # A shard the manifest does not list is refused too (DCP's reader would read every .safetensors file).
    shutil.rmtree(copy)
    shutil.copytree(root / copy.name, copy)
    shutil.copy(sorted(copy.glob("*.safetensors"))[0], copy / "stray.safetensors")
    with pytest.raises(CheckpointError, match="stray.safetensors, which its manifest does not list"):
        load_sharded(copy, model, optimizer, None)


def test_a_temporary_without_manifest_is_not_a_checkpoint(saved, tmp_path):
    root, _ = saved
    runs = tmp_path / "checkpoints"
    final = runs / f"step_{STEP:08d}"
    shutil.copytree(root / final.name, final)
    # What a run killed mid-save leaves: shards in a temporary named by moekit.atomic, no manifest yet.
    stale = runs / ".tmp-step_00000009-999999-0123abcd"
    shutil.copytree(final, stale)
    (stale / "manifest.json").unlink()
    assert list_checkpoints(runs) == [final]
    assert clean_partial(runs) == [stale] and not stale.exists()
    # A step directory without its manifest (never committed by save_sharded) is refused on load.
    incomplete = runs / "step_00000009"
    shutil.copytree(final, incomplete)
    (incomplete / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="is incomplete: .*manifest.json is missing"):
        load_sharded(incomplete, *_fresh(), None)
