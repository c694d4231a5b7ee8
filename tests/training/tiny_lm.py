"""Helpers shared by the training and command tests: a tiny synthetic corpus and a tiny run config (seconds, not
minutes). A module with a unique name, imported explicitly, rather than ``from conftest import``: several test
folders have a conftest."""

from __future__ import annotations

import random
from pathlib import Path

WORDS = (
    "the cat dog sat ran on a mat rug big small red blue and then it was very happy sad one two three "
    "return value of function given list dict string number error file path"
).split()


def write_tiny_corpus(path: Path, sentences: int = 1500, seed: int = 0) -> Path:
    """A deterministic word-salad corpus (~60 KB) with some structure to learn (word pairs repeat)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(sentences):
        n = rng.randint(4, 10)
        words = [rng.choice(WORDS)]
        for _ in range(n - 1):
            # a strong bigram: each word prefers the word after it in WORDS
            nxt = WORDS[(WORDS.index(words[-1]) + 1) % len(WORDS)] if rng.random() < 0.6 else rng.choice(WORDS)
            words.append(nxt)
        lines.append(" ".join(words).capitalize() + ".")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def tiny_config_text(corpus: Path, **train: object) -> str:
    values = {
        "max_steps": 12,
        "batch_size": 4,
        "seed": 0,
        "log_every": 1,
        "eval_every": 6,
        "eval_batches": 2,
        "checkpoint_every": 4,
        "keep_checkpoints": 3,
        "lr": 3e-3,
        "warmup_steps": 2,
        "threads": 1,
        "progress": "off",
    }
    values.update(train)
    train_lines = "\n".join(f"{k} = {v!r}" if not isinstance(v, str) else f'{k} = "{v}"' for k, v in values.items())
    return f"""
[model]
d_model = 32
n_layers = 2
n_heads = 2
d_ff = 64
moe_every = 2
moe_offset = 1

[moe]
num_experts = 4
top_k = 1
capacity_factor = 1.25
jitter_eps = 0.01

[data]
corpus = "{corpus}"
vocab_size = 300
seq_len = 16
piece_chars = 512

[train]
{train_lines}
""".replace("True", "true").replace("False", "false")
