"""A labelled task under several prompt templates: one result per template and the spread, and
the task's calibration text written in its calibration templates (calibrate/templates.py)."""

from __future__ import annotations

from dataclasses import dataclass

from calibrate.corpora import Corpus
from calibrate.prompts import DEFAULT_SEED
from calibrate.tasks import Task, TaskResult, check_task, evaluate_task
from calibrate.templates import PromptTemplate, calibration_documents

CALIBRATION_FORMS = ("templates", "templates-mix")
TASK_TEXTS = ("prompts", *CALIBRATION_FORMS)  # what --task calibrates on; prompts: the task's own, with 'N/A'
DEFAULT_TASK_TEXT = "prompts"


@dataclass
class TemplateReport:
    """One :class:`TaskResult` per template (same evaluated messages) and the spread of each figure."""

    task: str
    results: list[TaskResult]

    def spread(self, figure: str) -> tuple[float, float] | None:
        """(min, max) of ``figure`` (``balanced_accuracy``, ``auc``, ...) over the templates; None without values."""
        values = [getattr(r, figure) for r in self.results if getattr(r, figure) is not None]
        return (min(values), max(values)) if values else None

    def to_dict(self) -> dict:
        figures = ("balanced_accuracy", "auc", "plain_balanced_accuracy")
        return {"task": self.task, "templates": [r.to_dict() for r in self.results],
                "spread": {f: self.spread(f) for f in figures}}


def evaluate_templates(model, tokenizer, task: Task, templates: list[PromptTemplate], size: int | None = None,
                       seed: int = DEFAULT_SEED, batch_size: int = 16) -> TemplateReport:
    """``model`` on ``task`` under each template, on the same evaluated subset (drawn with ``seed``)."""
    results = [evaluate_task(model, tokenizer, task, size=size, seed=seed, batch_size=batch_size,
                             template=template) for template in templates]
    return TemplateReport(task.name, results)


def templates_task_corpus(task: Task, form: str = "templates", seed: int = DEFAULT_SEED) -> Corpus:
    """The calibration part of ``task`` written in its calibration templates (``templates``), or
    those documents alternating with the raw texts (``templates-mix``); for ``sms_spam`` the same
    documents as the corpus of that name."""
    if form not in CALIBRATION_FORMS:
        raise ValueError(f"form {form!r} is not one of {CALIBRATION_FORMS}")
    check_task(task)
    part = task.calibration
    documents, what = calibration_documents(task.name, form, part.texts, part.labels, task.labels, seed)
    raw = ", half raw texts" if form == "templates-mix" else ""
    return Corpus(f"{task.name}:{form}", "documents", documents, f"{task.source} ({what}{raw})", "calibration")
