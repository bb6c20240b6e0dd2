"""Corpora: the named ones with fixed calibration/evaluation parts, and custom ones.

Built-in parts follow PROTOCOL.md: ``wikitext2`` calibrates on the validation split and evaluates
on the test split; ``sms_spam`` calibrates on messages with index i % 5 != 4 and evaluates on
i % 5 == 4. ``sms_spam:task`` is the same messages written as the few-shot
prompts of the ``sms_spam`` task (calibrate/prompts.py: shots from the calibration part only, each
message followed by its label word) and ``sms_spam:mix`` half raw messages, half those prompts;
``sms_spam:task-ref`` and ``sms_spam:mix-ref`` end each prompt with the content-free query the task's
choice subtracts (``Message: N/A`` and ``Label:``, no label word). ``sms_spam:templates`` writes each
calibration message in one of the task's calibration templates (calibrate/templates.py), never an
evaluation template; ``sms_spam:templates-mix`` alternates those with raw messages.
Custom corpora (a ``.txt`` file of blank-line separated documents, a folder of ``.txt``
files, ``.jsonl``/``.json``/``.csv``/``.parquet`` with a text field, or a hub dataset
``name[:config]``) use the same fixed hold-out: document i is in the evaluation part when
i % 5 == 4, in the calibration part otherwise; ``all`` is every document.
"""

from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from calibrate.errors import ConfigError, GluPruneError
from calibrate.prompts import (
    DEFAULT_REFERENCE,
    DEFAULT_SEED,
    DEFAULT_SHOTS,
    SMS_FORMAT,
    TaskFormat,
    mix_documents,
    task_documents,
)
from calibrate.templates import calibration_documents

PARTS = ("calibration", "evaluation", "all")
FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".csv", ".parquet")
HOLDOUT = 5


@dataclass
class Corpus:
    """Rows of text; ``kind`` 'documents' are joined and packed, 'messages' stay one per sequence."""

    name: str
    kind: str
    texts: list[str]
    source: str
    part: str


@dataclass(frozen=True)
class Builtin:
    kind: str
    files: dict[str, str]
    parts: dict[str, tuple[str, int | None]]
    hub: tuple[str, str | None, str]
    url: str


BUILTINS = {
    "wikitext2": Builtin(
        kind="documents",
        files={"test": "wikitext-2-raw-v1/wiki.test.raw", "validation": "wikitext-2-raw-v1/wiki.valid.raw",
               "train": "wikitext-2-raw-v1/wiki.train.raw"},
        parts={"calibration": ("validation", None), "evaluation": ("test", None)},
        hub=("wikitext", "wikitext-2-raw-v1", "text"),
        url="https://huggingface.co/datasets/Salesforce/wikitext (wikitext-2-raw-v1.zip)",
    ),
    "sms_spam": Builtin(
        kind="messages",
        files={"train": "sms_spam/SMSSpamCollection"},
        parts={"calibration": ("train", 0), "evaluation": ("train", 1)},
        hub=("sms_spam", None, "sms"),
        url="https://archive.ics.uci.edu/dataset/228/sms+spam+collection",
    ),
}
# built-in corpora whose rows carry labels: their label order (the last is the positive one) and prompt format
LABELLED: dict[str, tuple[tuple[str, ...], TaskFormat]] = {"sms_spam": (("ham", "spam"), SMS_FORMAT)}
TASK_FORMS = ("task", "mix", "task-ref", "mix-ref", "templates", "templates-mix")
BUILTIN = set(BUILTINS) | {f"{name}:{form}" for name in LABELLED for form in TASK_FORMS}


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The local corpora folder: the argument, else $GLU_DATA_DIR, else None (the hub)."""
    chosen = data_dir if data_dir is not None else os.environ.get("GLU_DATA_DIR")
    if chosen is None or chosen == "":
        return None
    path = Path(chosen).expanduser()
    if not path.is_dir():
        raise GluPruneError(f"data directory {path} does not exist: pass --data-dir pointing at the corpora folder")
    return path


def is_evaluation(index: int) -> bool:
    """The fixed hold-out: row ``index`` belongs to the evaluation part when index % 5 == 4."""
    return index % HOLDOUT == HOLDOUT - 1


def holdout(rows: list[str], part: str, name: str) -> list[str]:
    """The fixed split of a corpus's rows: evaluation is every row with index i % 5 == 4."""
    if part == "all":
        return rows
    chosen = [r for i, r in enumerate(rows) if is_evaluation(i) == (part == "evaluation")]
    if not chosen:
        raise GluPruneError(f"corpus '{name}' has {len(rows)} documents, too few for a {part} part "
                            f"(every 5th document is held out): use --part all or add documents")
    return chosen


def read_text(path: Path) -> str:
    data = path.read_bytes()
    if b"\x00" in data:
        raise GluPruneError(f"{path} is a binary file, not text: pass a UTF-8 text corpus")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise GluPruneError(f"{path} is not valid UTF-8 text: convert it to UTF-8") from None


def raw_lines(path: Path) -> list[str]:
    """Lines of a file, each keeping its newline (as the Hugging Face builders read them)."""
    return read_text(path).splitlines(keepends=True)


def builtin_rows(name: str, split: str, data_dir: Path | None) -> tuple[list[str], str]:
    spec = BUILTINS[name]
    if split not in spec.files:
        raise GluPruneError(f"corpus '{name}' has no split '{split}': choose from {', '.join(spec.files)}")
    if data_dir is None:
        return hub_rows(name, split)
    path = builtin_path(name, split, data_dir)
    lines = raw_lines(path)
    if name == "sms_spam":
        rows = [sms_fields(line)[1] for line in lines]
    else:
        rows = [line if line.strip() else "" for line in lines]
    return rows, str(path)


def sms_fields(line: str) -> tuple[str, str]:
    """(label, message) of one line of the SMS Spam Collection (label, a tab, the message)."""
    label, tab, text = line.partition("\t")
    return (label, text) if tab else ("", "")


def builtin_path(name: str, split: str, data_dir: Path) -> Path:
    spec = BUILTINS[name]
    path = data_dir / spec.files[split]
    if not path.is_file():
        raise GluPruneError(f"{spec.files[split]} is missing from {data_dir}: get it from {spec.url} "
                            f"or drop --data-dir to read the hub")
    return path


def labelled_part(name: str, part: str, data_dir: str | Path | None = None) -> tuple[list[str], list[str], str]:
    """(texts, labels, source) of a labelled built-in corpus's part, split as :func:`load_corpus`
    splits it; texts without their line terminator."""
    if part not in ("calibration", "evaluation"):
        raise ConfigError("part", part, f"corpus '{name}' has fixed parts: use calibration or evaluation")
    raw_split, parity = BUILTINS[name].parts[part]
    directory = resolve_data_dir(data_dir)
    if directory is None:
        rows, source = hub_labelled(name, raw_split)
    else:
        path = builtin_path(name, raw_split, directory)
        rows, source = [sms_fields(line) for line in raw_lines(path)], str(path)
    chosen = [(label, text.rstrip("\r\n")) for i, (label, text) in enumerate(rows) if is_evaluation(i) == bool(parity)]
    return [t for _, t in chosen], [label for label, _ in chosen], source


def hub_labelled(name: str, split: str) -> tuple[list[tuple[str, str]], str]:
    dataset, config, field = BUILTINS[name].hub
    try:
        from datasets import load_dataset

        data = load_dataset(dataset, config, split=split)
        names = data.features["label"].names
        rows = [(names[label], text) for label, text in zip(data["label"], data[field])]
    except Exception as exc:  # network, missing dataset, ...
        raise GluPruneError(f"could not load '{name}' from the Hugging Face hub ({type(exc).__name__}): "
                            f"pass --data-dir with local copies of the corpora") from exc
    return rows, f"hub:{dataset}"


def task_corpus(name: str, form: str, part: str | None, split: str | None, data_dir) -> Corpus:
    """``NAME:task`` (few-shot prompts with their labels) or ``NAME:mix`` (half raw messages, half
    prompts) of a labelled built-in corpus, each prompt followed by the content-free query in the
    ``-ref`` forms; shots always come from the calibration part."""
    if split is not None or part not in ("calibration", "evaluation"):
        raise ConfigError("part", split or part, f"corpus '{name}:{form}' has fixed parts: use calibration or "
                                                 f"evaluation")
    order, fmt = LABELLED[name]
    pool_texts, pool_labels, source = labelled_part(name, "calibration", data_dir)
    if form.startswith("templates"):
        return templates_corpus(name, form, part, (pool_texts, pool_labels), order, source)
    texts, labels = (pool_texts, pool_labels) if part == "calibration" else labelled_part(name, part, data_dir)[:2]
    documents = task_documents(fmt, texts, labels, (pool_texts, pool_labels), list(order), DEFAULT_SHOTS,
                               DEFAULT_SEED, same_part=part == "calibration",
                               reference=DEFAULT_REFERENCE if form.endswith("-ref") else None)
    if form.startswith("mix"):
        documents = mix_documents(texts, documents)
    query = f", each then asking for the label of {DEFAULT_REFERENCE!r}" if form.endswith("-ref") else ""
    where = f"{source} ({part} part as {DEFAULT_SHOTS}-shot {name} prompts{query}, seed {DEFAULT_SEED})"
    return Corpus(f"{name}:{form}", "documents", documents, where, part)


def templates_corpus(name: str, form: str, part: str, pool: tuple[list[str], list[str]], order: tuple[str, ...],
                     source: str) -> Corpus:
    """``NAME:templates``: each calibration message in one of the task's calibration templates
    (calibrate/templates.py, never an evaluation template), with its own shots and label word;
    ``NAME:templates-mix``: those documents alternating with raw messages, half of each by characters."""
    if part != "calibration":
        raise ConfigError("part", part, f"corpus '{name}:{form}' is calibration text only: use calibration")
    documents, what = calibration_documents(name, form, *pool, order)
    where = f"{source} ({what}{', half raw messages' if form.endswith('-mix') else ''})"
    return Corpus(f"{name}:{form}", "documents", documents, where, part)


def hub_rows(name: str, split: str) -> tuple[list[str], str]:
    dataset, config, field = BUILTINS[name].hub
    try:
        from datasets import load_dataset

        rows = load_dataset(dataset, config, split=split)[field]
    except Exception as exc:  # network, missing dataset, ...
        raise GluPruneError(f"could not load '{name}' from the Hugging Face hub ({type(exc).__name__}): "
                            f"pass --data-dir with local copies of the corpora") from exc
    return list(rows), f"hub:{dataset}" + (f"/{config}" if config else "")


def load_builtin(name: str, part: str | None, split: str | None, data_dir: Path | None) -> Corpus:
    spec = BUILTINS[name]
    if split is not None:
        rows, source = builtin_rows(name, split, data_dir)
        return Corpus(name, spec.kind, rows, source, split)
    if part == "all":
        raise ConfigError("part", part, f"corpus '{name}' has fixed parts: use calibration or evaluation, or a split")
    raw_split, parity = spec.parts[part]
    rows, source = builtin_rows(name, raw_split, data_dir)
    if parity is not None:
        rows = [r for i, r in enumerate(rows) if is_evaluation(i) == bool(parity)]
    return Corpus(name, spec.kind, rows, source, part)


def split_documents(text: str) -> list[str]:
    """Documents of a text separated by one or more blank lines."""
    return [d.strip("\n") for d in re.split(r"\n(?:[ \t\r\f\v]*\n)+", text.replace("\r\n", "\n")) if d.strip()]


def table_rows(path: Path) -> list[dict]:
    suffix = path.suffix
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    text = read_text(path)
    if suffix == ".csv":
        return list(csv.DictReader(text.splitlines()))
    if suffix == ".json" and text.lstrip().startswith("["):
        rows = json.loads(text)
    else:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise GluPruneError(f"{path} is not valid JSON lines ({exc.msg} at line {exc.lineno})") from None
    if not all(isinstance(r, dict) for r in rows):
        raise GluPruneError(f"{path} must hold JSON objects, one per document")
    return rows


def pick_field(rows: list[dict], text_field: str | None, where: str) -> list[str]:
    fields = list(rows[0]) if rows else []
    field = text_field or ("text" if "text" in fields else None)
    if field is None or field not in fields:
        problem = f"is not in {where}: its fields are {', '.join(map(str, fields))}"
        raise ConfigError("text_field", text_field, problem + "; choose one") if text_field else \
            GluPruneError(f"no 'text' field is in {where}: its fields are {', '.join(map(str, fields))}; name the "
                          f"text field (--text-field NAME)")
    return [str(r[field]) if r[field] is not None else "" for r in rows]


def file_documents(path: Path, text_field: str | None) -> list[str]:
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise GluPruneError(f"folder {path} has no .txt files: put documents in .txt files")
        return [doc for f in files for doc in split_documents(read_text(f))]
    if path.suffix in (".jsonl", ".json", ".csv", ".parquet"):
        return pick_field(table_rows(path), text_field, str(path))
    return split_documents(read_text(path))


def looks_like_path(text: str) -> bool:
    """A hub id is 'name' or 'owner/name' (with an optional ':config'); anything else is a path."""
    return text.startswith((".", "/", "~")) or text.endswith(FILE_SUFFIXES) or text.count("/") > 1


def load_custom(source: str, part: str, split: str | None, text_field: str | None, kind: str | None,
                name: str | None) -> Corpus:
    path = Path(source).expanduser()
    if path.exists():
        documents, where = file_documents(path, text_field), str(path)
        label = name or (path.stem if path.is_file() else path.name)
    elif looks_like_path(source):
        raise GluPruneError(f"corpus '{source}' is neither a built-in corpus ({', '.join(sorted(BUILTIN))}) "
                            f"nor an existing file or folder: check the path")
    else:
        documents, where = hub_dataset(source, split, text_field), f"hub:{source}"
        label = name or source.replace("/", "_").replace(":", "_")
    if not any(d.strip() for d in documents):
        raise GluPruneError(f"corpus '{source}' is empty (no text): pass a corpus with text")
    documents = [d for d in documents if d.strip()]
    return Corpus(label, kind or "documents", holdout(documents, part, label), where, part)


def hub_dataset(source: str, split: str | None, text_field: str | None) -> list[str]:
    name, _, config = source.partition(":")
    if text_field is None:
        raise GluPruneError(f"corpus '{source}' is not a built-in corpus ({', '.join(sorted(BUILTIN))}) nor an "
                            f"existing file or folder; for a hub dataset, pass --text-field naming its text column")
    try:
        from datasets import load_dataset

        data = load_dataset(name, config or None, split=split or "train")
    except Exception as exc:
        raise GluPruneError(f"could not load hub dataset '{source}' ({type(exc).__name__}): check the name, "
                            f"or pass a local file") from exc
    if text_field not in data.column_names:
        raise ConfigError("text_field", text_field, f"is not in {source}: its fields are "
                            f"{', '.join(data.column_names)}")
    return list(data[text_field])


def load_corpus(name_or_path: str, part: str | None = None, split: str | None = None,
                data_dir: str | Path | None = None, text_field: str | None = None, kind: str | None = None,
                name: str | None = None) -> Corpus:
    """Load a built-in corpus part or split, or a custom corpus.

    ``part`` is ``calibration`` (the default), ``evaluation`` or ``all`` (custom corpora); ``split``
    names a raw split instead. Evaluate on the evaluation part, never on what you calibrated on.
    """
    if part is not None and split is not None:
        raise ConfigError("part", part, "give a part or a split, not both")
    part = part or ("calibration" if split is None else None)
    if part is not None and part not in PARTS:
        raise ConfigError("part", part, f"choose one of {', '.join(PARTS)}")
    if kind is not None and kind not in ("documents", "messages"):
        raise GluPruneError(f"corpus kind '{kind}' is not 'documents' or 'messages'")
    base, _, form = name_or_path.partition(":")
    if base in LABELLED and form in TASK_FORMS:
        corpus = task_corpus(base, form, part, split, data_dir)
        if name:
            corpus.name = name
        return corpus
    if name_or_path in BUILTINS:
        corpus = load_builtin(name_or_path, part, split, resolve_data_dir(data_dir))
        if name:
            corpus.name = name
        return corpus
    return load_custom(name_or_path, part or "all", split, text_field, kind, name)
