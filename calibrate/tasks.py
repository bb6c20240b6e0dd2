"""Labelled tasks: few-shot classification by label log-likelihood, scored beyond perplexity.

A task is labelled texts in two fixed parts. The built-in ``sms_spam`` is the SMS Spam Collection
split as the ``sms_spam`` corpus (calibration: message i with i % 5 != 4; evaluation: i % 5 == 4).
A custom task is a ``.csv``/``.jsonl``/``.json``/``.parquet`` file with a text and a label field;
rows with blank text are dropped, then row i is in the evaluation part when i % 5 == 4, unless the
file has a ``split`` field (``calibration``/``train`` or ``evaluation``/``test`` in every row).
An evaluation example whose text also appears in the calibration part is dropped (``repeats``
counts them): the SMS collection repeats messages, and a repeat would put an evaluated message,
with its label, into the shots and into the task-formatted calibration text (``sms_spam:task``).

Evaluation: ``shots`` examples, balanced across labels, drawn once from the calibration part with
``seed``, then each message of a balanced subset of the evaluation part (``size`` messages, by
default every example of the rarest label and as many of each other label, drawn with ``seed``)
is scored by ``sum log p(label word tokens | prompt)`` for every label (calibrate/prompts.py
writes the prompt). The sequence scored is BOS + tokens(prompt) + tokens(label word). Every
prompt starts with the same instruction and shots, so their common tokens run once and their
key/value cache serves every batch (``prefix_cache``); padding never enters a score.

The chosen label maximises its score minus its score for a content-free ``reference`` message
("N/A") under the same shots (contextual calibration, Zhao et al. 2021): SmolLM2-135M prefers
" spam" to " ham" after almost any prompt, so the plain choice calls nearly every message spam.
The plain choice (the highest score) is reported too (``plain_balanced_accuracy``); the AUC of
the margin (positive label's score minus the other's) is the same for both, a constant apart.

Why not an lm-evaluation-harness task (``--lm-eval`` still runs harness tasks): the harness
recomputes the whole few-shot context for every message (no shared-prefix cache: 209 tokens
per SMS message against 39), its samplers do not balance shots across labels, and balanced accuracy,
the AUC of the label margin and their intervals would need custom metric code beside a YAML
file written to disk for every custom task.
"""

from __future__ import annotations

import copy
import inspect
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from calibrate.batches import pad_id, with_bos
from calibrate.corpora import LABELLED, Corpus, is_evaluation, labelled_part, table_rows
from calibrate.errors import ConfigError, GluPruneError
from calibrate.progress import shown
from calibrate.prompts import (
    DEFAULT_REFERENCE,
    DEFAULT_SEED,
    DEFAULT_SHOTS,
    TaskFormat,
    by_label,
    custom_format,
    fixed_shots,
    task_documents,
)
from calibrate.task_metrics import BOOTSTRAP, LEVEL, auc, bootstrap_intervals, recalls
from calibrate.templates import PromptTemplate

TASK_SUFFIXES = (".csv", ".jsonl", ".json", ".parquet")
SPLITS = {"calibration": "calibration", "train": "calibration", "evaluation": "evaluation", "test": "evaluation"}


@dataclass
class Labelled:
    texts: list[str]
    labels: list[str]


@dataclass
class Task:
    """Labelled texts in a calibration and an evaluation part; ``labels`` in order, the last one
    the positive label of the AUC."""

    name: str
    labels: tuple[str, ...]
    format: TaskFormat
    calibration: Labelled
    evaluation: Labelled
    source: str
    repeats: int = 0

    @property
    def positive(self) -> str | None:
        return self.labels[-1] if len(self.labels) == 2 else None


@dataclass
class TaskResult:
    """Scores of one model on a task; ``scores`` (per example and label, plain log-likelihoods) and
    ``truth`` stay out of :meth:`to_dict`."""

    task: str
    n: int
    per_label: dict[str, int]
    shots: int
    seed: int
    balanced_accuracy: float
    accuracy: float
    recall: dict[str, float]
    auc: float | None
    balanced_accuracy_ci: tuple[float, float]
    auc_ci: tuple[float, float] | None
    plain_balanced_accuracy: float
    plain_recall: dict[str, float]
    reference: str | None
    reference_scores: dict[str, float] | None
    interval: str
    positive: str | None
    format: str
    prompt: str
    shot_indices: list[int]
    prefix_tokens: int
    seconds: float
    repeats: int = 0
    note: str = ""
    template: str = ""
    scores: list[list[float]] = field(default_factory=list)
    truth: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        del out["scores"], out["truth"]
        return out


def load_task(name_or_path: str, data_dir: str | Path | None = None, text_field: str | None = None,
              label_field: str | None = None, name: str | None = None) -> Task:
    """The built-in task ``sms_spam`` (from the corpora folder, see :func:`calibrate.corpora.load_corpus`)
    or a labelled file (fields ``text_field``/``label_field``, by default ``text`` and ``label``)."""
    if name_or_path in LABELLED:
        order, fmt = LABELLED[name_or_path]
        cal_texts, cal_labels, source = labelled_part(name_or_path, "calibration", data_dir)
        ev_texts, ev_labels, _ = labelled_part(name_or_path, "evaluation", data_dir)
        return without_repeats(Task(name or name_or_path, tuple(order), fmt, Labelled(cal_texts, cal_labels),
                                    Labelled(ev_texts, ev_labels), source))
    path = Path(name_or_path).expanduser()
    if not path.is_file() or path.suffix not in TASK_SUFFIXES:
        raise GluPruneError(f"task '{name_or_path}' is neither a built-in task ({', '.join(sorted(LABELLED))}) nor "
                            f"an existing {'/'.join(TASK_SUFFIXES)} file: check the name or the path")
    return file_task(path, text_field, label_field, name or path.stem)


def field_of(fields: list[str], chosen: str | None, default: str, option: str, where: Path) -> str:
    names = ", ".join(map(str, fields))
    if chosen is not None and chosen not in fields:
        raise ConfigError(option, chosen, f"is not in {where}: its fields are {names}; choose one")
    if chosen is None and default not in fields:
        raise GluPruneError(f"no '{default}' field is in {where}: its fields are {names}; name the {default} field "
                            f"(--{option.replace('_', '-')} NAME)")
    return chosen or default


def file_task(path: Path, text_field: str | None, label_field: str | None, name: str) -> Task:
    rows = table_rows(path)
    fields = list(rows[0]) if rows else []
    if not rows:
        raise GluPruneError(f"task file {path} has no rows: add labelled examples")
    text_key = field_of(fields, text_field, "text", "text_field", path)
    label_key = field_of(fields, label_field, "label", "label_field", path)
    rows = [r for r in rows if r.get(text_key) is not None and str(r[text_key]).strip()]
    missing = [i for i, r in enumerate(rows) if r.get(label_key) is None or str(r[label_key]).strip() == ""]
    if missing:
        raise GluPruneError(f"task file {path}: example {missing[0]} has no label in field '{label_key}'; "
                            f"label every example")
    parts = {"calibration": Labelled([], []), "evaluation": Labelled([], [])}
    for i, row in enumerate(rows):
        part = split_of(row, i, path) if "split" in fields else ("evaluation" if is_evaluation(i) else "calibration")
        parts[part].texts.append(str(row[text_key]))
        parts[part].labels.append(str(row[label_key]).strip())
    labels = sorted(set(parts["calibration"].labels) | set(parts["evaluation"].labels))
    task = without_repeats(Task(name, tuple(labels), custom_format(labels), parts["calibration"], parts["evaluation"],
                                str(path)))
    check_task(task)
    return task


def without_repeats(task: Task) -> Task:
    """``task`` without the evaluation examples whose text is also a calibration text."""
    seen = set(task.calibration.texts)
    kept = [(t, label) for t, label in zip(task.evaluation.texts, task.evaluation.labels) if t not in seen]
    task.repeats = len(task.evaluation.texts) - len(kept)
    task.evaluation = Labelled([t for t, _ in kept], [label for _, label in kept])
    return task


def task_calibration_corpus(task: Task, reference: str | None = DEFAULT_REFERENCE) -> Corpus:
    """The calibration part of ``task`` as the few-shot prompts the task runs: each example with
    its own balanced shots and its label word, then (with ``reference``) the query for the
    content-free text; for ``sms_spam`` the same documents as the corpus ``sms_spam:task-ref``."""
    check_task(task)
    part = task.calibration
    documents = task_documents(task.format, part.texts, part.labels, (part.texts, part.labels), list(task.labels),
                               DEFAULT_SHOTS, DEFAULT_SEED, same_part=True, reference=reference)
    query = f", each then asking for the label of {reference!r}" if reference is not None else ""
    form = "task-ref" if reference is not None else "task"
    return Corpus(f"{task.name}:{form}", "documents", documents,
                  f"{task.source} (calibration part as {DEFAULT_SHOTS}-shot {task.name} prompts{query}, "
                  f"seed {DEFAULT_SEED})", "calibration")


def split_of(row: dict, index: int, path: Path) -> str:
    value = str(row.get("split", "")).strip().lower()
    if value not in SPLITS:
        raise GluPruneError(f"task file {path}: example {index} has split '{row.get('split')}'; use calibration "
                            f"(or train) and evaluation (or test)")
    return SPLITS[value]


def check_task(task: Task) -> None:
    if len(task.labels) < 2:
        only = f" (every example is '{task.labels[0]}')" if task.labels else ""
        raise GluPruneError(f"task '{task.name}' has one label{only}: a task needs examples of two or more labels")
    for part in ("calibration", "evaluation"):
        present = set(getattr(task, part).labels)
        absent = [label for label in task.labels if label not in present]
        if absent:
            raise GluPruneError(f"task '{task.name}': its {part} part has no example of label '{absent[0]}'; add "
                                f"some (or give the file a split field)")


def balanced_subset(labels: list[str], order: tuple[str, ...], size: int | None, seed: int, name: str) -> list[int]:
    """Indices of ``size`` examples (default: every example of the rarest label and as many of
    each other), the same number of each label, drawn with ``seed``, in their original order."""
    groups = by_label(labels, list(order))
    smallest = min(len(g) for g in groups.values())
    if size is not None and size < len(order):
        raise ConfigError("task_size", size, f"is smaller than the number of labels ({len(order)})")
    per = smallest if size is None else size // len(order)
    if per > smallest:
        rare = min(groups, key=lambda k: len(groups[k]))
        raise ConfigError("task_size", size, f"asks {per} examples of each label but the evaluation part of "
                                             f"'{name}' has {smallest} of '{rare}': use at most "
                                             f"{smallest * len(order)}")
    rng = random.Random(seed)
    return sorted(i for g in groups.values() for i in (g if per == len(g) else rng.sample(g, per)))


def common_prefix(rows: list[list[int]]) -> int:
    first, n = rows[0], min(len(r) for r in rows)
    for i in range(n):
        if any(r[i] != first[i] for r in rows):
            return i
    return n


def cache_keyword(model) -> str:
    """The forward argument that takes a key/value cache (``cache`` in newer transformers)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefix_cache_of(model, prefix: list[int], device):
    out = model(input_ids=torch.tensor([prefix], device=device), use_cache=True)
    cache = out.get("cache")
    return cache if cache is not None else out.get("past_key_values")


def sequence_logprobs(model, tokenizer, rows: list[list[int]], wanted: list[list[tuple[int, int]]], prefix: int,
                      batch_size: int) -> list[list[float]]:
    """For each row, ``log p(token | earlier tokens)`` at each (position, token) it asks for; the
    first ``prefix`` tokens (shared by every row) run once and their cache serves every batch, and
    the vocabulary projection runs only from a batch's first asked position on."""
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    cache = prefix_cache_of(model, rows[0][:prefix], device) if prefix else None
    keyword = cache_keyword(model)
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    out: list[list[float]] = [[] for _ in rows]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]), reverse=True)
    bar = tqdm(total=len(rows), unit="seq", desc="task", disable=not shown(default=False), leave=False)
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        width = max(len(rows[i]) for i in batch) - prefix
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), prefix + width), dtype=torch.long)
        for b, i in enumerate(batch):
            suffix = rows[i][prefix:]
            ids[b, : len(suffix)] = torch.tensor(suffix)
            mask[b, : prefix + len(suffix)] = 1
        extra = {"use_cache": False}
        if cache is not None:  # a copy per batch: the forward appends this batch's keys and values to it
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(batch))
            extra = {keyword: batch_cache, "use_cache": True}
        first = min(p for i in batch for p, _ in wanted[i]) - prefix if keep_logits else 0
        if keep_logits:  # the vocabulary projection only from the batch's first asked position on
            extra["logits_to_keep"] = width - first
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **extra).logits
        for b, i in enumerate(batch):
            positions = torch.tensor([p - prefix - first for p, _ in wanted[i]], device=logits.device)
            targets = torch.tensor([t for _, t in wanted[i]], device=logits.device)
            logp = torch.log_softmax(logits[b, positions].double(), dim=-1)
            out[i] = logp[torch.arange(len(targets), device=logits.device), targets].tolist()
        bar.update(len(batch))
    bar.close()
    return out


def label_scores(model, tokenizer, fmt: TaskFormat, labels: tuple[str, ...], prompts: list[str],
                 batch_size: int = 16, prefix_cache: bool = True) -> tuple[np.ndarray, int]:
    """``sum log p(label word tokens | BOS + prompt)`` for every prompt and label (a prompts × labels
    array), and the number of leading tokens that ran once for all of them."""
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be at least 1")
    words = [tokenizer(fmt.label_words[label], add_special_tokens=False)["input_ids"] for label in labels]
    empty = [label for label, w in zip(labels, words) if not w]
    if empty:
        raise GluPruneError(f"label '{empty[0]}' has no tokens: give it a label word")
    contexts = [with_bos(tokenizer, tokenizer(p)["input_ids"]) for p in prompts]
    rows: dict[tuple[int, ...], list[tuple[int, int]]] = {}  # a row asked by several labels runs once
    asks = []
    for context in contexts:
        for word in words:
            row = tuple(context + word[:-1])
            wanted = [(len(context) - 1 + t, token) for t, token in enumerate(word)]
            rows.setdefault(row, [])
            asks.append((row, len(rows[row]), len(wanted)))
            rows[row] += wanted
    unique = list(rows)
    prefix = min(common_prefix(contexts), min(len(c) for c in contexts) - 1) if prefix_cache else 0
    with torch.inference_mode():
        logprobs = sequence_logprobs(model, tokenizer, [list(r) for r in unique], list(rows.values()), prefix,
                                     batch_size)
    where = {row: k for k, row in enumerate(unique)}
    flat = [sum(logprobs[where[row]][start : start + count]) for row, start, count in asks]
    scores = np.array(flat, dtype=np.float64).reshape(len(prompts), len(labels))
    if not np.isfinite(scores).all():
        raise GluPruneError("label scores are not finite (NaN/inf logits): evaluate in --dtype float32 or bfloat16")
    return scores, prefix


def evaluate_task(model, tokenizer, task: Task, shots: int = DEFAULT_SHOTS, size: int | None = None,
                  seed: int = DEFAULT_SEED, reference: str | None = DEFAULT_REFERENCE, batch_size: int = 16,
                  prefix_cache: bool = True, template: PromptTemplate | None = None) -> TaskResult:
    """Few-shot accuracy of ``model`` on ``task`` (see the module docstring): balanced accuracy,
    per-label recall, AUC of the margin (two labels), and their 95% stratified bootstrap intervals.
    ``reference`` None chooses by the plain scores. A ``template`` (calibrate/templates.py) sets the
    format, the shots and their order, and the reference instead of ``shots``/``reference`` and the
    task's format; ``seed`` still draws the evaluated subset, so every template sees the same messages."""
    check_task(task)
    order = task.labels
    where = f"the calibration part of task '{task.name}'"
    if template is None:
        shot_ids = fixed_shots(task.calibration.labels, list(order), shots, seed, where=where)
    else:
        task = copy.copy(task)
        task.format, shots, reference = template.format(order), template.shots, template.reference
        shot_ids = template.shot_indices(task.calibration.labels, order, where=where)
    shot_pairs = [(task.calibration.texts[i], task.calibration.labels[i]) for i in shot_ids]
    chosen = balanced_subset(task.evaluation.labels, order, size, seed, task.name)
    texts = [task.evaluation.texts[i] for i in chosen]
    truth_labels = [task.evaluation.labels[i] for i in chosen]
    start = time.perf_counter()
    extra = [] if reference is None else [reference]
    scores, prefix = label_scores(model, tokenizer, task.format, order, [task.format.prompt(shot_pairs, t)
                                                                         for t in extra + texts], batch_size,
                                  prefix_cache)
    seconds = time.perf_counter() - start
    offset, scores = (scores[0], scores[1:]) if extra else (np.zeros(len(order)), scores)
    truth = np.array([order.index(label) for label in truth_labels])
    predicted = (scores - offset).argmax(axis=1)
    plain = recalls(truth, scores.argmax(axis=1), len(order))
    two = len(order) == 2
    margin = scores[:, 1] - scores[:, 0] if two else None
    intervals = bootstrap_intervals(truth, predicted, margin, len(order), seed)
    recall = recalls(truth, predicted, len(order))
    return TaskResult(
        task=task.name, n=len(chosen), per_label={k: int((truth == i).sum()) for i, k in enumerate(order)},
        shots=shots, seed=seed, balanced_accuracy=float(recall.mean()), accuracy=float((predicted == truth).mean()),
        recall={k: float(recall[i]) for i, k in enumerate(order)},
        auc=auc(margin[truth == 1], margin[truth == 0]) if two else None,
        balanced_accuracy_ci=intervals["balanced_accuracy"], auc_ci=intervals.get("auc"),
        plain_balanced_accuracy=float(plain.mean()), plain_recall={k: float(plain[i]) for i, k in enumerate(order)},
        reference=reference, reference_scores=dict(zip(order, offset.tolist())) if extra else None,
        interval=f"{LEVEL:.0%} percentile interval of a stratified bootstrap ({BOOTSTRAP} resamples, seed {seed})",
        positive=task.positive, format=task.format.describe(), prompt=task.format.prompt(shot_pairs, "{text}"),
        shot_indices=shot_ids, prefix_tokens=prefix, seconds=round(seconds, 3), repeats=task.repeats,
        note="" if two else f"{len(order)} labels: no AUC (it needs two)",
        scores=scores.tolist(), truth=truth_labels, template=template.name if template is not None else "")
