"""Prompt templates as data (pure): the evaluation templates a task is scored under, and the
calibration templates that task-formatted calibration text is written in.

A :class:`PromptTemplate` fixes everything of a few-shot prompt but the message: the instruction,
the example text (with ``{text}``), each label's word, the number of shots, the seed that draws
them from the task's calibration part, their order, and the content-free ``reference`` message
whose label scores the choice subtracts (None: the plain choice, the highest score).

Two disjoint tables per task kind. ``EVALUATION`` holds ``default`` (the evaluator's own prompt,
what ``--task`` calibrated on before templates existed) and templates that no calibration text is
ever written in; ``CALIBRATION`` holds the templates of the ``NAME:templates`` corpora. Built-in
``sms_spam`` (labels ham, spam) has its own tables with chosen label words; a task read from a file
gets generic tables whose label words are its label values. Shots always come from the calibration
part, and evaluated messages from the evaluation part, so no evaluated message is ever a shot or
calibration text (tests/test_templates.py checks it).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from calibrate.errors import GluPruneError
from calibrate.prompts import DEFAULT_REFERENCE, DEFAULT_SEED, DEFAULT_SHOTS, TaskFormat, balanced_shots, by_label

ORDERS = ("shuffled", "grouped", "grouped-reversed")
SHOT_CHOICES = (0, 2, 4, 6)  # shots per calibration document, drawn per document


@dataclass(frozen=True)
class PromptTemplate:
    """One few-shot prompt layout. ``label_words`` maps each label to its word (with its leading
    space), or is a pattern with ``{label}`` applied to every label; ``instruction`` may hold
    ``{labels}`` (the task's labels, comma-separated)."""

    name: str
    instruction: str
    example: str
    label_words: dict[str, str] | str
    shots: int = DEFAULT_SHOTS
    seed: int = DEFAULT_SEED
    order: str = "shuffled"
    reference: str | None = DEFAULT_REFERENCE
    separator: str = "\n\n"

    def words(self, labels: tuple[str, ...]) -> dict[str, str]:
        """Each label's word; a template written for other labels is refused."""
        if isinstance(self.label_words, str):
            return {label: self.label_words.replace("{label}", label) for label in labels}
        missing = [label for label in labels if label not in self.label_words]
        if missing:
            raise GluPruneError(f"template '{self.name}' has no word for label '{missing[0]}' (it is written for "
                                f"labels {', '.join(self.label_words)})")
        return {label: self.label_words[label] for label in labels}

    def format(self, labels: tuple[str, ...]) -> TaskFormat:
        """The template as a :class:`TaskFormat` for a task with ``labels``."""
        return TaskFormat(instruction=self.instruction.replace("{labels}", ", ".join(labels)), template=self.example,
                          label_words=self.words(labels), separator=self.separator)

    def shot_indices(self, labels: list[str], order: tuple[str, ...], where: str = "the calibration part") -> list[int]:
        """The template's shots: indices into the calibration part's ``labels``, balanced, in its order."""
        return ordered(balanced_shots(labels, list(order), self.shots, random.Random(self.seed), where=where),
                       labels, order, self.order)

    def describe(self, labels: tuple[str, ...]) -> str:
        """The template as one string (recorded with results)."""
        ref = f"reference {self.reference!r}" if self.reference is not None else "plain choice"
        return (f"{self.name}: {self.format(labels).describe()}; {self.shots} shots (seed {self.seed}, "
                f"{self.order}); {ref}")


def ordered(indices: list[int], labels: list[str], order: tuple[str, ...], how: str) -> list[int]:
    """``indices`` as drawn (``shuffled``), or grouped by label in task order (``grouped``) or in
    reverse task order (``grouped-reversed``), each group in drawing order."""
    if how not in ORDERS:
        raise GluPruneError(f"shot order '{how}' is not one of {', '.join(ORDERS)}")
    if how == "shuffled":
        return list(indices)
    rank = {label: i for i, label in enumerate(order if how == "grouped" else order[::-1])}
    return sorted(indices, key=lambda i: rank[labels[i]])


SMS_EVALUATION = (  # the unseen ones chosen on calibration messages only (docs/tasks.md#unseen-prompt-templates)
    PromptTemplate("default", "Each SMS message below is labelled spam or ham (not spam).", "Message: {text}\nLabel:",
                   {"ham": " ham", "spam": " spam"}),
    PromptTemplate("yes-no", "For each SMS, answer whether it is spam (yes or no).", "SMS: {text}\nSpam? Answer:",
                   {"ham": " no", "spam": " yes"}, shots=6, seed=111),
    PromptTemplate("yes-no-plain", "For each SMS, answer whether it is spam (yes or no).", "SMS: {text}\nSpam? Answer:",
                   {"ham": " no", "spam": " yes"}, shots=6, seed=111, reference=None),
    PromptTemplate("junk", "Sort each phone message into junk or normal.", 'SMS: "{text}"\nCategory:',
                   {"ham": " normal", "spam": " junk"}, shots=6, seed=202, reference=None),
    PromptTemplate("answer", "Label each message as ham (a normal message) or spam.", "Message: {text}\nAnswer:",
                   {"ham": " ham", "spam": " spam"}, shots=8, seed=303),
)

SMS_CALIBRATION = (
    PromptTemplate("c-class", "Classify the texts: spam or ham.", "Text: {text}\nClass:",
                   {"ham": " ham", "spam": " spam"}, seed=1001),
    PromptTemplate("c-scam", "Is this SMS legit or a scam?", "{text}\nVerdict:", {"ham": " legit", "spam": " scam"},
                   seed=1002),
    PromptTemplate("c-true", "Answer true if the message is spam, false otherwise.", "Q: {text}\nSpam:",
                   {"ham": " false", "spam": " true"}, seed=1003, reference=None),
    PromptTemplate("c-wanted", "Each message below is marked wanted or unwanted.", "[{text}] ->",
                   {"ham": " wanted", "spam": " unwanted"}, seed=1004, reference=None),
)

GENERIC_EVALUATION = (
    PromptTemplate("default", "Each text below is labelled {labels}.", "Text: {text}\nLabel:", " {label}"),
    PromptTemplate("answer", "Give the category of each text ({labels}).", "Input: {text}\nCategory:", " {label}",
                   shots=4, seed=101, order="grouped"),
    PromptTemplate("quoted", "Texts and their labels ({labels}).", '"{text}"\n->', " {label}", shots=6, seed=202,
                   order="grouped-reversed", reference=None),
    PromptTemplate("plain", "Label each text as one of: {labels}.", "Text: {text}\nAnswer:", " {label}", shots=2,
                   seed=303, reference=None),
    PromptTemplate("colon", "{labels}: which one is each text?", "{text}\n=> this text is", " {label}", shots=8,
                   seed=404, reference="[no text]"),
)

GENERIC_CALIBRATION = (
    PromptTemplate("c-class", "Classify the texts: {labels}.", "Text: {text}\nClass:", " {label}", seed=1001),
    PromptTemplate("c-verdict", "Which of {labels} is this?", "{text}\nVerdict:", " {label}", seed=1002),
    PromptTemplate("c-q", "Label the question ({labels}).", "Q: {text}\nA:", " {label}", seed=1003, reference=None),
    PromptTemplate("c-arrow", "Each item below is marked {labels}.", "[{text}] ->", " {label}", seed=1004,
                   reference=None),
)


def tables(task_name: str) -> tuple[tuple[PromptTemplate, ...], tuple[PromptTemplate, ...]]:
    """(evaluation templates, calibration templates) of a task: ``sms_spam``'s own, else the generic ones."""
    return (SMS_EVALUATION, SMS_CALIBRATION) if task_name == "sms_spam" else (GENERIC_EVALUATION, GENERIC_CALIBRATION)


def pick_templates(task_name: str, names: str) -> list[PromptTemplate]:
    """Evaluation templates by comma-separated name; ``all`` is every one, ``unseen`` every one but ``default``."""
    table = tables(task_name)[0]
    known = {t.name: t for t in table}
    if names.strip() in ("all", "unseen"):
        return [t for t in table if names.strip() == "all" or t.name != "default"]
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    bad = [n for n in chosen if n not in known]
    if bad or not chosen:
        raise GluPruneError(f"unknown template '{bad[0] if bad else names}' for task '{task_name}': use all, unseen "
                            f"or names from {', '.join(known)}")
    return [known[n] for n in chosen]


def template_documents(templates: tuple[PromptTemplate, ...], texts: list[str], labels: list[str],
                       order: tuple[str, ...], seed: int = DEFAULT_SEED) -> list[str]:
    """Each calibration (text, label) written in a template taken in turn from ``templates``, with its own
    shots (a count from :data:`SHOT_CHOICES`, balanced, never the text itself, drawn from ``texts``
    with ``seed``) and its label word; for a template with a reference, then the reference query."""
    rng = random.Random(seed)
    groups = by_label(labels, list(order))
    smallest = min(len(g) for g in groups.values())
    documents = []
    for i, (text, label) in enumerate(zip(texts, labels)):
        template = templates[i % len(templates)]
        fmt = template.format(order)
        count = min(rng.choice(SHOT_CHOICES), (smallest - 1) * len(order))
        picked = ordered(balanced_shots(labels, list(order), count - count % len(order), rng, exclude=i), labels,
                         order, rng.choice(ORDERS))
        document = fmt.prompt([(texts[j], labels[j]) for j in picked], text) + fmt.label_words[label]
        if template.reference is not None:
            document = fmt.separator.join([document, fmt.example(template.reference)])
        documents.append(document)
    return documents


def half_raw(raw: list[str], formatted: list[str]) -> list[str]:
    """Each formatted document followed by the next raw texts (one per line) until they are at least
    as long; stops when the raw texts run out, so the result is about half raw text by characters."""
    mixed, r = [], 0
    for document in formatted:
        block, size = [], 0
        while r < len(raw) and size < len(document):
            block.append(raw[r])
            size += len(raw[r]) + 1
            r += 1
        if size < len(document):
            break
        mixed += [document, "\n".join(block)]
    return mixed


def calibration_documents(task_name: str, form: str, texts: list[str], labels: list[str], order: tuple[str, ...],
                          seed: int = DEFAULT_SEED) -> tuple[list[str], str]:
    """(documents, what they are) of a task's calibration (text, label) pairs written in its calibration
    templates (``form`` ``templates``), or those documents followed by raw texts (``templates-mix``,
    :func:`half_raw`)."""
    templates = tables(task_name)[1]
    documents = template_documents(templates, texts, labels, order, seed)
    if form.endswith("-mix"):
        documents = half_raw(texts, documents)
    names = ", ".join(t.name for t in templates)
    return documents, f"calibration part in {len(templates)} calibration templates {names}"
