"""A resume on a disk that is still full (issue 18): the partial checkpoint a killed write left behind is freed
before the session writes anything, so the space it held is there for the session's own files."""

from __future__ import annotations

import errno
from pathlib import Path

from tiny_lm import tiny_config_text

from moekit.lab.training import run as run_module
from moekit.lab.training.run import train_run
from moekit.lab.training.run_config import load_run_config
from moekit.training import checkpoint as ckpt


def test_a_resume_frees_a_stale_partial_checkpoint_before_writing_anything(tmp_path, tiny_corpus, monkeypatch):
    cfg = tmp_path / "tiny.toml"
    cfg.write_text(tiny_config_text(tiny_corpus, max_steps=4))
    run_dir = tmp_path / "run"
    train_run(load_run_config(cfg), run_dir, log=lambda m: None)
    root = run_dir / "checkpoints"
    # What a write killed mid-checkpoint leaves (its process is gone); the disk is full while it is there.
    stale = root / ".tmp-step_00000008-4242-0123abcd"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 65536)
    real_write = run_module.atomic_write_text
    writes: list[str] = []

    def write_on_a_full_disk(path: Path, text: str, **kwargs) -> None:
        writes.append(Path(path).name)
        if any(p.name.startswith(".tmp-") for p in root.iterdir()):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        real_write(path, text, **kwargs)

    monkeypatch.setattr(run_module, "atomic_write_text", write_on_a_full_disk)
    messages: list[str] = []
    run_config = load_run_config(cfg)
    run_config.train.max_steps = 6
    summary = train_run(run_config, run_dir, resume=True, log=messages.append)
    # Before: config.toml was rewritten first and the disk, still holding the partial checkpoint, refused it.
    assert writes[0] == "config.toml"
    assert summary["steps"] == 6
    assert f"removed a partial checkpoint left by an interrupted write: {stale}" in messages
    assert [p.name for p in ckpt.list_checkpoints(root)] == ["step_00000006", "step_00000004", "step_00000000"]
