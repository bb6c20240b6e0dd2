"""Few-shot prompts of labelled tasks as text (pure): the format, the shots, task-formatted documents.

A prompt is the instruction, then ``k`` labelled shots, then the message to label, joined by a
blank line; each example is the template with ``{text}`` filled in, and a shot ends with its label
word. Shots always come from the calibration part; ``task_documents`` never mixes the two parts.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from calibrate.errors import ConfigError, GluPruneError

DEFAULT_SHOTS = 4
DEFAULT_SEED = 0
DEFAULT_REFERENCE = "N/A"  # the content-free message whose label scores are subtracted (calibrate/tasks.py)


@dataclass(frozen=True)
class TaskFormat:
    """How a labelled example is written: ``instruction``, ``template`` (holds ``{text}``) and each
    label's word (with its leading space), which follows the template."""

    instruction: str
    template: str
    label_words: dict[str, str]
    separator: str = "\n\n"

    def example(self, text: str, label: str | None = None) -> str:
        """One example; without ``label`` it ends where the label word would start."""
        return self.template.replace("{text}", text) + (self.label_words[label] if label is not None else "")

    def prompt(self, shots: list[tuple[str, str]], text: str) -> str:
        """The instruction, the (text, label) shots, and ``text`` waiting for its label."""
        examples = [self.example(t, label) for t, label in shots]
        return self.separator.join([self.instruction, *examples, self.example(text)])

    def describe(self) -> str:
        """The format as one string (recorded with results)."""
        words = ", ".join(f"{label}={word!r}" for label, word in self.label_words.items())
        return f"{self.instruction!r} + shots + {self.template!r}, joined by {self.separator!r}; label words {words}"


SMS_FORMAT = TaskFormat(
    instruction="Each SMS message below is labelled spam or ham (not spam).",
    template="Message: {text}\nLabel:",
    label_words={"ham": " ham", "spam": " spam"},
)


def custom_format(labels: list[str]) -> TaskFormat:
    """The format of a task read from a file: its label values are the label words."""
    return TaskFormat(instruction=f"Each text below is labelled {', '.join(labels)}.", template="Text: {text}\nLabel:",
                      label_words={label: f" {label}" for label in labels})


def by_label(labels: list[str], order: list[str]) -> dict[str, list[int]]:
    return {label: [i for i, x in enumerate(labels) if x == label] for label in order}


def shot_counts(order: list[str], shots: int) -> dict[str, int]:
    """``shots`` spread over the labels as evenly as possible; the first labels take the remainder."""
    if shots < 0:
        raise ConfigError("shots", shots, "must be 0 or more")
    share, extra = divmod(shots, len(order))
    return {label: share + (i < extra) for i, label in enumerate(order)}


def balanced_shots(labels: list[str], order: list[str], shots: int, rng: random.Random,
                   exclude: int | None = None, where: str = "the calibration part") -> list[int]:
    """Indices of ``shots`` examples balanced across ``order``, drawn with ``rng`` (never
    ``exclude``), in a shuffled order so that no label always comes last."""
    groups = by_label(labels, order)
    chosen = []
    for label, count in shot_counts(order, shots).items():
        pool = [i for i in groups[label] if i != exclude]
        if len(pool) < count:
            raise GluPruneError(f"{where} has {len(pool)} examples of label '{label}', fewer than the {count} "
                                f"shots of that label that {shots} shots need: lower --shots or add examples")
        chosen += rng.sample(pool, count)
    rng.shuffle(chosen)
    return chosen


def fixed_shots(labels: list[str], order: list[str], shots: int = DEFAULT_SHOTS, seed: int = DEFAULT_SEED,
                where: str = "the calibration part") -> list[int]:
    """The shots every evaluated message shares: indices into the calibration part."""
    return balanced_shots(labels, order, shots, random.Random(seed), where=where)


def task_documents(fmt: TaskFormat, texts: list[str], labels: list[str], pool: tuple[list[str], list[str]],
                   order: list[str], shots: int = DEFAULT_SHOTS, seed: int = DEFAULT_SEED,
                   same_part: bool = True, reference: str | None = None) -> list[str]:
    """Each (text, label) as the model sees it in the task: ``shots`` shots from ``pool`` (the
    calibration part's texts and labels), the text, its label word. Every document draws its own
    balanced shots (seeded), so that a few messages do not fill the statistics; with
    ``same_part`` (``texts`` is the pool itself) a document never shows its own text as a shot.
    With ``reference``, each document then asks for the label of that content-free text (no label
    word follows): the query whose scores the few-shot choice subtracts (calibrate/tasks.py)."""
    pool_texts, pool_labels = pool
    rng = random.Random(seed)
    documents = []
    for i, (text, label) in enumerate(zip(texts, labels)):
        picked = balanced_shots(pool_labels, order, shots, rng, exclude=i if same_part else None)
        document = fmt.prompt([(pool_texts[j], pool_labels[j]) for j in picked], text) + fmt.label_words[label]
        documents.append(document if reference is None else fmt.separator.join([document, fmt.example(reference)]))
    return documents


def mix_documents(raw: list[str], formatted: list[str]) -> list[str]:
    """Half raw text, half task-formatted by characters: each formatted document is followed by
    the next raw texts (one per line, at least one) whose length comes nearest to its own; stops
    when the raw texts run out."""
    mixed, r = [], 0
    for document in formatted:
        block, size = [], 0
        while r < len(raw) and (not block or size + (len(raw[r]) + 1) / 2 < len(document)):
            block.append(raw[r])
            size += len(raw[r]) + 1
            r += 1
        if size < len(document) / 2:
            break
        mixed += [document, "\n".join(block)]
    return mixed
