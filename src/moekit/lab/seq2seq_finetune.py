"""Text-to-text fine-tuning of a pre-trained encoder-decoder run on labelled tasks (``moekit finetune-seq2seq``).

What and why: the encoder-decoder runs (``model.arch = "seq2seq"``) are pre-trained with span corruption; the
ST-MoE and Switch papers then fine-tune them on labelled tasks as text to text. Here a task of
:mod:`moekit.lab.adapters.tasks` (an :class:`~moekit.lab.adapters.tasks.Example`: instruction + input, candidate
answers, the right one) becomes

- encoder input: the example's text (the task instruction + the input), cut to ``max_input_tokens - 1`` tokens,
  then end-of-text (as ``moekit generate`` feeds a seq2seq run);
- target: the right answer's tokens, then end-of-text.

Scoring on the test split, one example at a time (so an example's result never depends on which others share its
batch: MoE routing groups and capacity are per call):

- **exact match**: greedy decoding (at most as many tokens as the longest candidate plus end-of-text), cut at
  end-of-text, decoded with special tokens shown; right when the text equals the gold answer (surrounding
  whitespace ignored);
- **rank classification**: every candidate's summed log-probability of its target (answer tokens and end-of-text)
  under teacher forcing; the highest wins, ties broken by candidate order;
- **majority class**: always answering the training split's most frequent gold answer (ties: first seen).

Training uses moekit's :class:`~moekit.training.trainer.Trainer` (why: its learning-rate schedule, clipping,
non-finite policy, routing metrics in ``metrics.jsonl`` and atomic checkpoints are what a fine-tuning run needs as
well). Three small adapters make it fit: :class:`TaskBatches` (a ``BatchSource`` of padded example batches),
:class:`AnswerEvalData` (an ``EvalData`` of the test examples one by one: ``val_loss`` is the gold answers'
cross-entropy per target token), and :class:`PaddedSeq2Seq` (the model behind ``model(inputs, labels)`` with the
padding mask the trainer cannot pass). A Trainer subclass adds the exact-match and rank scores to each evaluation.

``--update``: ``all`` trains every parameter; ``non-moe`` freezes the MoE layers' parameters (routers, experts,
shared experts and their gate: every parameter of a :class:`~moekit.layers.MoE` module; loss-free balancing biases
stop moving too) and trains the rest; ``moe`` trains those only.

``--dropout`` / ``--expert-dropout`` set the modules' rates (:func:`set_dropout`): ``dropout`` reaches
:class:`~moekit.models.seq2seq.T5Stack` (embeddings and final output), :class:`~moekit.models.seq2seq.T5Block`
(attention sublayer outputs), :class:`~moekit.models.seq2seq.T5Attention` (attention probabilities),
:class:`~moekit.models.seq2seq.FeedForwardSublayer` (FFN sublayer outputs, dense or MoE) and the dense FFNs'
hidden activation (:class:`~moekit.layers.DenseFFN` outside MoE layers); ``expert_dropout`` reaches each MoE
layer's :class:`~moekit.experts.bank.ExpertBank` hidden activation and its shared experts' ``DenseFFN``. Switch's
fine-tuning recipe is ``--dropout 0.1 --expert-dropout 0.4``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.atomic import atomic_write_text
from moekit.config import check_choice, check_int, check_number, check_positive_int, check_unit_interval
from moekit.errors import ConfigError, MoekitError
from moekit.lab.adapters.tasks import INSTRUCTIONS, Example, build_tasks
from moekit.layers.dense import DenseFFN
from moekit.layers.moe import MoE
from moekit.models.seq2seq import (
    IGNORE_INDEX,
    FeedForwardSublayer,
    Seq2SeqLM,
    T5Attention,
    T5Block,
    T5Stack,
)
from moekit.routing.topk import TopKRouter
from moekit.training.config import OPTIMIZERS, TrainConfig
from moekit.training.trainer import Trainer

__all__ = [
    "UPDATES",
    "Seq2SeqFinetuneConfig",
    "EncodedExample",
    "TaskBatches",
    "AnswerEvalData",
    "PaddedSeq2Seq",
    "Prediction",
    "parse_tasks",
    "encode_examples",
    "set_dropout",
    "select_trainable",
    "moe_parameter_names",
    "score_example",
    "score_all",
    "majority_answers",
    "accuracies",
    "finetune_seq2seq",
]

UPDATES = ("all", "non-moe", "moe")
# Marks encoder padding in the batches the trainer hands to the model (a real id can be 0: end-of-text is id 0).
INPUT_PAD = -1


@dataclass
class Seq2SeqFinetuneConfig:
    """One fine-tuning run (every field is a ``moekit finetune-seq2seq`` option; all go to ``config.json``).

    Attributes:
        tasks: task names of :mod:`moekit.lab.adapters.tasks` (several: multitask, their training examples pooled).
        update: "all", "non-moe" (MoE parameters frozen) or "moe" (only MoE parameters train).
        steps: optimizer steps (0: score the pre-trained model only).
        batch_size: examples per step.
        lr: learning rate (constant after ``warmup_steps``, as T5 fine-tunes).
        optimizer: "adamw" or "adafactor".
        warmup_steps: linear warm-up steps.
        weight_decay: decoupled weight decay.
        grad_clip: global gradient-norm clip (0: off).
        seed: the data order, dropout and every other random draw; the split of the tasks too.
        dropout: residual / attention / embedding / dense-FFN dropout rate; None keeps the run's ``model.dropout``.
        expert_dropout: expert hidden dropout; None keeps the run's ``moe.expert_dropout``.
        eval_every: score the test split every N steps (0: only at the end).
        max_input_tokens: encoder input length cap, end-of-text included.
        n_train: training examples kept per task.
        n_test: test examples scored per task.
        threads: torch threads (0: automatic); applied by the command, recorded here.
    """

    tasks: list[str] = field(default_factory=list)
    update: str = "all"
    steps: int = 200
    batch_size: int = 16
    lr: float = 1e-3
    optimizer: str = "adamw"
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    dropout: float | None = None
    expert_dropout: float | None = None
    eval_every: int = 0
    max_input_tokens: int = 128
    n_train: int = 1000
    n_test: int = 100
    threads: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.tasks, str):
            self.tasks = parse_tasks(self.tasks)
        if not isinstance(self.tasks, list) or not self.tasks:
            raise ConfigError("--task needs at least one task name")
        for name in self.tasks:
            if name not in INSTRUCTIONS:
                raise ConfigError(f"unknown task {name!r}; known: {', '.join(sorted(INSTRUCTIONS))}")
        if len(set(self.tasks)) != len(self.tasks):
            raise ConfigError(f"--task names a task twice: {','.join(self.tasks)}")
        check_choice("--update", self.update, UPDATES)
        check_choice("--optimizer", self.optimizer, OPTIMIZERS)
        check_int("--steps", self.steps, 0)
        check_int("--seed", self.seed, 0)
        check_int("--eval-every", self.eval_every, 0)
        check_int("--warmup-steps", self.warmup_steps, 0)
        check_int("--threads", self.threads, 0)
        for name in ("batch_size", "n_train", "n_test"):
            check_positive_int(f"--{name.replace('_', '-')}", getattr(self, name))
        check_int("--max-input-tokens", self.max_input_tokens, 2)  # at least one text token and end-of-text
        check_number("--lr", self.lr, low=0.0, low_open=True)
        check_number("--weight-decay", self.weight_decay, low=0.0)
        check_number("--grad-clip", self.grad_clip, low=0.0)
        for name in ("dropout", "expert_dropout"):
            if getattr(self, name) is not None:
                check_unit_interval(f"--{name.replace('_', '-')}", getattr(self, name))


def parse_tasks(text: str) -> list[str]:
    """``"a,b"`` -> ``["a", "b"]`` (spaces around names ignored; empty names refused)."""
    names = [t.strip() for t in str(text).split(",")]
    if not names or any(not n for n in names):
        raise ConfigError(f"--task must be task names separated by commas, got {text!r}")
    return names


# -- data -------------------------------------------------------------------------------------------------------


@dataclass
class EncodedExample:
    """One example as token ids: the encoder input (end-of-text last) and each candidate's target (its tokens, then
    end-of-text). ``index`` is the example's position in its task's split."""

    task: str
    index: int
    input_ids: list[int]
    candidates: list[str]
    candidate_ids: list[list[int]]
    label: int

    @property
    def target_ids(self) -> list[int]:
        return self.candidate_ids[self.label]


def encode_examples(
    tokenizer: Any, examples: dict[str, list[Example]], max_input_tokens: int, eos_id: int
) -> list[EncodedExample]:
    """Tokenise every example of every task (tasks in the dict's order)."""
    cache: dict[str, list[int]] = {}
    out = []
    for task, items in examples.items():
        texts = [e.text for e in items]
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False) if texts else []
        for i, (ex, enc) in enumerate(zip(items, encodings, strict=True)):
            if not 0 <= ex.label < len(ex.candidates):
                raise MoekitError(f"task {task!r} example {i}: label {ex.label} outside its {len(ex.candidates)}"
                                  " candidates")
            cand_ids = []
            for cand in ex.candidates:
                if cand not in cache:
                    ids = tokenizer.encode(cand, add_special_tokens=False).ids
                    if not ids:
                        raise MoekitError(f"task {task!r}: candidate answer {cand!r} encodes to no tokens")
                    cache[cand] = [*ids, eos_id]
                cand_ids.append(cache[cand])
            # Cut the text, never the end-of-text that closes it (the model was pre-trained on inputs ending so).
            out.append(EncodedExample(task, i, [*enc.ids[: max_input_tokens - 1], eos_id], list(ex.candidates),
                                      cand_ids, ex.label))
    return out


def _pad(rows: list[list[int]], value: int) -> Tensor:
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


class TaskBatches:
    """Endless training batches ``(inputs_BS, labels_BT)`` over the pooled examples of every task (examples-
    proportional mixing), in a fresh order each epoch (``numpy.random.default_rng([seed, epoch])``). Inputs are
    padded with ``INPUT_PAD``, labels with -100. A :class:`~moekit.training.trainer.BatchSource`."""

    def __init__(self, examples: list[EncodedExample], batch_size: int, seed: int) -> None:
        if not examples:
            raise MoekitError("no training examples to fine-tune on")
        self.examples = examples
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.examples))

    def next_batch(self) -> tuple[Tensor, Tensor]:
        picked = []
        while len(picked) < self.batch_size:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation()
            picked.append(self.examples[int(self._order[self.position])])
            self.position += 1
        return _pad([e.input_ids for e in picked], INPUT_PAD), _pad([e.target_ids for e in picked], IGNORE_INDEX)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation()


class AnswerEvalData:
    """The test examples with their gold targets, one per batch (no padding, so the trainer's token-weighted mean is
    the exact cross-entropy per gold target token, and no example's routing depends on another). An
    :class:`~moekit.training.trainer.EvalData`; ``batch_size`` is ignored."""

    def __init__(self, examples: list[EncodedExample]) -> None:
        self.examples = examples

    def batches(self, batch_size: int, max_batches: int | None) -> Iterator[tuple[Tensor, Tensor]]:
        chosen = self.examples if max_batches is None else self.examples[:max_batches]
        for e in chosen:
            yield torch.tensor([e.input_ids]), torch.tensor([e.target_ids])


class PaddedSeq2Seq(nn.Module):
    """``model(inputs_BS, labels_BT)`` for the trainer, with encoder padding (``INPUT_PAD``) turned into the
    attention mask (padding is also kept out of the MoE layers' capacity and losses). ``lm`` is the
    :class:`~moekit.models.Seq2SeqLM`."""

    def __init__(self, lm: Seq2SeqLM) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, inputs_BS: Tensor, labels_BT: Tensor) -> Any:
        mask_BS = inputs_BS != INPUT_PAD
        ids_BS = inputs_BS.masked_fill(~mask_BS, self.lm.config.pad_token_id)
        return self.lm(ids_BS, labels_BT, attention_mask_BS=mask_BS)


# -- the model ----------------------------------------------------------------------------------------------------


def _expert_modules(model: nn.Module) -> list[nn.Module]:
    out: list[nn.Module] = []
    for moe in (m for m in model.modules() if isinstance(m, MoE)):
        out.append(moe.experts)
        if moe.shared_experts is not None:
            out.append(moe.shared_experts)
    return out


def set_dropout(model: nn.Module, dropout: float | None, expert_dropout: float | None) -> dict[str, int]:
    """Set the dropout rates of a :class:`~moekit.models.Seq2SeqLM` in place (None leaves a rate as it is); returns
    how many modules each rate reached (``{"dropout": n, "expert_dropout": m}``). The modules read their ``dropout``
    attribute at every forward, so no rebuild is needed. Which modules: see the module docstring."""
    experts = {id(m) for m in _expert_modules(model)}
    reached = {"dropout": 0, "expert_dropout": 0}
    for m in model.modules():
        if id(m) in experts:
            if expert_dropout is not None:
                m.dropout = float(expert_dropout)
                reached["expert_dropout"] += 1
        elif isinstance(m, (T5Stack, T5Block, T5Attention, FeedForwardSublayer, DenseFFN)):
            if dropout is not None:
                m.dropout = float(dropout)
                reached["dropout"] += 1
    return reached


def moe_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters inside MoE layers (routers, expert banks, shared experts and their gate)."""
    names: set[str] = set()
    for prefix, m in model.named_modules():
        if isinstance(m, MoE):
            names.update(f"{prefix}.{n}" if prefix else n for n, _ in m.named_parameters())
    return names


def select_trainable(model: nn.Module, update: str) -> dict[str, int]:
    """Set ``requires_grad`` by ``update`` ("all", "non-moe", "moe"); returns parameter counts (``total``,
    ``moe``, ``trainable``). A frozen MoE layer's loss-free balancing bias is frozen too (its update would move
    the routing the freeze is meant to keep)."""
    check_choice("--update", update, UPDATES)
    moe_names = moe_parameter_names(model)
    counts = {"total": 0, "moe": 0, "trainable": 0}
    for name, p in model.named_parameters():
        is_moe = name in moe_names
        train = update == "all" or (update == "moe") == is_moe
        p.requires_grad_(train)
        counts["total"] += p.numel()
        counts["moe"] += p.numel() if is_moe else 0
        counts["trainable"] += p.numel() if train else 0
    if update == "non-moe":
        for m in model.modules():
            if isinstance(m, TopKRouter) and m.expert_load is not None:
                m.bias_update_rate = 0.0
                m.expert_load = None  # no longer a balancing router (moekit.routing.balance.balancing_routers)
    return counts


# -- scoring ------------------------------------------------------------------------------------------------------


@dataclass
class Prediction:
    """One scored test example (a line of ``predictions.jsonl``)."""

    task: str
    index: int
    gold: str
    gold_index: int
    exact_match_prediction: str
    exact_match_correct: bool
    rank_prediction: str
    rank_index: int
    rank_correct: bool
    candidates: list[str]
    log_likelihoods: list[float]


@torch.no_grad()
def score_example(model: Seq2SeqLM, tokenizer: Any, example: EncodedExample, eos_id: int) -> Prediction:
    """Greedy exact match and rank classification of one example (the model in eval mode).

    The encoder runs once; each candidate gets its own decoder call (so a candidate's MoE routing does not depend
    on the others), exactly what ``model(input_ids, labels)`` computes for that candidate alone."""
    ids_1S = torch.tensor([example.input_ids])
    encoder_1SD, _ = model.encode(ids_1S)
    lls = []
    for cand in example.candidate_ids:
        labels_1T = torch.tensor([cand])
        logits_1TV, _ = model.decode(model.shift_right(labels_1T), encoder_1SD,
                                     moe_mask_BT=torch.ones_like(labels_1T, dtype=torch.bool))
        logp_1TV = F.log_softmax(logits_1TV.float(), dim=-1)
        lls.append(float(logp_1TV.gather(-1, labels_1T[..., None]).sum()))
    best = 0
    for i, ll in enumerate(lls):
        if ll > lls[best]:  # strict: a tie keeps the earlier candidate
            best = i
    max_new = max(len(c) for c in example.candidate_ids)
    out = model.generate(ids_1S[0], max_new, temperature=0.0, eos_token_id=eos_id).tolist()[1:]
    if eos_id in out:
        out = out[: out.index(eos_id)]
    text = tokenizer.decode(out, skip_special_tokens=False)
    gold = example.candidates[example.label]
    return Prediction(
        task=example.task, index=example.index, gold=gold, gold_index=example.label,
        exact_match_prediction=text, exact_match_correct=text.strip() == gold.strip(),
        rank_prediction=example.candidates[best], rank_index=best, rank_correct=best == example.label,
        candidates=list(example.candidates), log_likelihoods=lls,
    )


def score_all(model: Seq2SeqLM, tokenizer: Any, examples: list[EncodedExample], eos_id: int) -> list[Prediction]:
    was_training = model.training
    model.eval()
    try:
        return [score_example(model, tokenizer, e, eos_id) for e in examples]
    finally:
        model.train(was_training)


def majority_answers(train: dict[str, list[Example]]) -> dict[str, str | None]:
    """Per task, the most frequent gold answer text of its training split (ties: the one seen first)."""
    out: dict[str, str | None] = {}
    for task, items in train.items():
        counts = Counter(e.candidates[e.label] for e in items)
        out[task] = max(counts, key=counts.__getitem__) if counts else None  # max keeps the first of equals
    return out


def accuracies(predictions: list[Prediction], majority: dict[str, str | None], tasks: list[str]) -> dict[str, Any]:
    """Per task and the mean over tasks: exact-match, rank-classification and majority-class accuracy."""
    per_task: dict[str, dict[str, Any]] = {}
    for task in tasks:
        rows = [p for p in predictions if p.task == task]
        n = len(rows)
        per_task[task] = {
            "n_test": n,
            "exact_match": sum(p.exact_match_correct for p in rows) / n if n else None,
            "rank": sum(p.rank_correct for p in rows) / n if n else None,
            "majority": sum(p.gold == majority.get(task) for p in rows) / n if n else None,
            "majority_answer": majority.get(task),
        }
    scored = [v for v in per_task.values() if v["n_test"]]

    def mean(key: str) -> float | None:
        return sum(v[key] for v in scored) / len(scored) if scored else None

    return {"tasks": per_task, "exact_match": mean("exact_match"), "rank": mean("rank"),
            "majority": mean("majority")}


class _FinetuneTrainer(Trainer):
    """The Trainer with exact-match and rank scoring added to every evaluation: ``val_loss`` stays the gold
    answers' cross-entropy, ``val_accuracy`` (in ``metrics.jsonl``) is the mean rank-classification accuracy, and
    ``evaluations`` keeps every score for ``summary.json``. Scoring draws no random number, so evaluating more or
    less often leaves the training trajectory unchanged."""

    def __init__(self, *args: Any, scorer: Callable[[], tuple[list[Prediction], dict[str, Any]]],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scorer = scorer
        self.evaluations: list[dict[str, Any]] = []
        self.last_predictions: list[Prediction] = []

    def evaluate(self) -> float:
        loss = super().evaluate()
        self.last_predictions, acc = self.scorer()
        self.last_val_accuracy = acc["rank"]
        self.evaluations.append({"step": self.step, "val_loss": loss, "exact_match": acc["exact_match"],
                                 "rank": acc["rank"]})
        return loss


# -- the run ------------------------------------------------------------------------------------------------------


def _check_out(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise MoekitError(f"output directory {out_dir} exists and is not empty; choose another --out")


def _finite(x: float) -> float | str:
    return x if math.isfinite(x) else str(x)  # standard JSON has no Infinity / NaN


def _clean(value: Any) -> Any:
    """``value`` with non-finite floats as strings, at any depth, so every output file is standard JSON."""
    if isinstance(value, float):
        return _finite(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _gold_loss(model: nn.Module, data: AnswerEvalData) -> float:
    """Cross-entropy per gold target token over the test examples (what the trainer's evaluation reports)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for inputs, targets in data.batches(1, None):
            total += float(model(inputs, targets).ce_loss) * targets.numel()
            count += targets.numel()
    return total / max(count, 1)


def finetune_seq2seq(
    run_dir: str | Path,
    out_dir: str | Path,
    config: Seq2SeqFinetuneConfig,
    *,
    examples: tuple[dict[str, list[Example]], dict[str, list[Example]]] | None = None,
    log: Callable[[str], None] | None = None,
    progress: str = "auto",
) -> dict[str, Any]:
    """Fine-tune the newest valid checkpoint of the seq2seq run ``run_dir`` on ``config.tasks`` into ``out_dir``
    (which must not exist or be empty) and score its test split; returns the summary also written to
    ``summary.json``.

    ``examples`` (``(train, test)`` dicts keyed by task name, the examples' text already holding the instruction)
    replaces the tasks' registry data, for tests and callers with their own examples. The thread count is the
    caller's (the command applies ``config.threads``)."""
    from moekit.lab.data.tokenizer import EOT, load_tokenizer
    from moekit.lab.training.run import load_trained_run, read_run_config

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    t0 = time.perf_counter()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_out(out_dir)
    run_config = read_run_config(run_dir)
    if run_config.arch != "seq2seq":
        raise MoekitError(f"{run_dir} is {run_config.task.title} (model.arch = {run_config.arch!r}) run; moekit "
                          "finetune-seq2seq works on encoder-decoder runs")
    loaded = load_trained_run(run_dir, fallback=True, warn=log)
    model: Seq2SeqLM = loaded.model
    tokenizer = load_tokenizer(loaded.data.tokenizer_path)
    eos_id = model.config.eos_token_id
    if eos_id is None:
        eos_id = tokenizer.token_to_id(EOT)
    has_moe = bool(model.moe_layers)
    if not has_moe and config.update != "all":
        raise MoekitError(f"--update {config.update} needs MoE layers; {run_dir} is a dense encoder-decoder")
    if not has_moe and config.expert_dropout is not None:
        raise MoekitError(f"--expert-dropout needs MoE layers; {run_dir} is a dense encoder-decoder")

    if examples is None:
        train_ex, test_ex = build_tasks(config.n_train, config.n_test, config.seed, tuple(config.tasks), ())
    else:
        train_ex, test_ex = examples
        missing = [t for t in config.tasks if t not in train_ex or t not in test_ex]
        if missing:
            raise MoekitError(f"no examples given for task(s) {missing}")
        train_ex = {t: train_ex[t][: config.n_train] for t in config.tasks}
        test_ex = {t: test_ex[t][: config.n_test] for t in config.tasks}
    train_enc = encode_examples(tokenizer, train_ex, config.max_input_tokens, eos_id)
    test_enc = encode_examples(tokenizer, test_ex, config.max_input_tokens, eos_id)
    if not test_enc:
        raise MoekitError(f"no test examples for {','.join(config.tasks)}")
    if config.steps > 0 and not train_enc:
        raise MoekitError(f"no training examples for {','.join(config.tasks)}")
    majority = majority_answers(train_ex)

    reached = set_dropout(model, config.dropout, config.expert_dropout)
    counts = select_trainable(model, config.update)
    moe_cfg = model.config.encoder_moe or model.config.decoder_moe
    resolved = {
        "dropout": model.config.dropout if config.dropout is None else config.dropout,
        "expert_dropout": (config.expert_dropout if config.expert_dropout is not None
                           else (moe_cfg.expert_dropout if moe_cfg is not None else None)),
        "modules_reached": reached,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "config.json", json.dumps({
        **dataclasses.asdict(config), "run_dir": str(run_dir), "checkpoint": str(loaded.checkpoint),
        "checkpoint_step": loaded.step, "resolved_dropout": resolved,
    }, indent=1) + "\n")
    log(f"fine-tuning {run_dir} (step {loaded.step}) on {','.join(config.tasks)}: {len(train_enc)} training and "
        f"{len(test_enc)} test examples; {counts['trainable']:,} of {counts['total']:,} parameters train "
        f"(--update {config.update})")

    def scorer() -> tuple[list[Prediction], dict[str, Any]]:
        preds = score_all(model, tokenizer, test_enc, eos_id)
        return preds, accuracies(preds, majority, config.tasks)

    wrapped = PaddedSeq2Seq(model)
    eval_data = AnswerEvalData(test_enc)
    torch.manual_seed(config.seed)  # dropout and router jitter draw from torch's global stream
    train_time, tokens_per_s, skipped, rollbacks = 0.0, None, 0, 0
    if config.steps > 0:
        train_config = TrainConfig(
            max_steps=config.steps, batch_size=config.batch_size, seed=config.seed,
            log_every=max(1, min(10, config.steps // 10)),  # at least ~10 lines, at most every 10 steps
            eval_every=config.eval_every, eval_batches=None,
            checkpoint_every=0, keep_checkpoints=2, optimizer=config.optimizer, lr=config.lr,
            weight_decay=config.weight_decay, warmup_steps=config.warmup_steps, schedule="constant",
            grad_clip=config.grad_clip, progress=progress,
        )
        trainer = _FinetuneTrainer(
            train_config, wrapped, TaskBatches(train_enc, config.batch_size, config.seed), eval_data, out_dir,
            extra_state={"finetune_seq2seq": dataclasses.asdict(config), "source_run": str(run_dir)}, log=log,
            scorer=scorer,
        )
        result = trainer.fit()
        predictions, evaluations = trainer.last_predictions, trainer.evaluations
        val_loss = result.final_val_loss
        train_time, tokens_per_s = result.train_time_s, result.tokens_per_s
        skipped, rollbacks = result.skipped_steps, result.rollbacks
    else:  # score the pre-trained model as it is (the zero-shot / before-fine-tuning point)
        wrapped.eval()
        val_loss = _gold_loss(wrapped, eval_data)
        predictions, acc = scorer()
        evaluations = [{"step": 0, "val_loss": val_loss, "exact_match": acc["exact_match"], "rank": acc["rank"]}]
        atomic_write_text(out_dir / "metrics.jsonl", json.dumps(
            _clean({"step": 0, "val_loss": val_loss, "val_accuracy": acc["rank"]})) + "\n")
    acc = accuracies(predictions, majority, config.tasks)
    lines = []
    for p in predictions:
        lines.append(json.dumps(_clean(dataclasses.asdict(p))) + "\n")
    atomic_write_text(out_dir / "predictions.jsonl", "".join(lines))
    summary = {
        "run_dir": str(run_dir), "out_dir": str(out_dir), "checkpoint_step": loaded.step,
        "tasks": config.tasks, "update": config.update, "steps": config.steps,
        "exact_match": acc["exact_match"], "rank": acc["rank"], "majority": acc["majority"],
        "per_task": acc["tasks"], "final_val_loss": val_loss, "evaluations": evaluations,
        "parameters": counts, "n_train": {t: len(v) for t, v in train_ex.items()},
        "dropout": resolved, "skipped_steps": skipped, "rollbacks": rollbacks,
        "train_time_s": train_time, "tokens_per_s": tokens_per_s,
        "wall_seconds": time.perf_counter() - t0,
    }
    atomic_write_text(out_dir / "summary.json", json.dumps(_clean(summary), indent=1) + "\n")
    return summary
