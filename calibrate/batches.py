"""Token batches for calibration: documents packed into fixed-length rows, or one message per row."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from transformers.utils import logging as hf_logging

from calibrate.errors import ConfigError, GluPruneError

if TYPE_CHECKING:
    from calibrate.corpora import Corpus

log = logging.getLogger("glu_prune")
SEPARATORS = {"documents": "\n\n", "messages": "\n"}


def tokenize_long(tokenizer, text: str) -> list[int]:
    """Token ids of one long text with the tokenizer's defaults, without the max-length warning."""
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return tokenizer(text)["input_ids"]
    finally:
        hf_logging.set_verbosity(verbosity)


PREFIX_MARGIN = 256  # tokens beyond the budget, so that the cut never changes the tokens kept


def tokenize_prefix(tokenizer, text: str, max_tokens: int | None) -> list[int]:
    """The first ``max_tokens`` token ids of ``text`` (all of them when None), tokenising only a
    growing prefix of the text: a large corpus with a small budget costs little time and memory.
    Tokenisers split text locally, so tokens well before the cut equal those of the whole text."""
    if max_tokens is None:
        return tokenize_long(tokenizer, text)
    chars = 8 * (max_tokens + PREFIX_MARGIN)
    while True:
        ids = tokenize_long(tokenizer, text[:chars])
        if chars >= len(text) or len(ids) >= max_tokens + PREFIX_MARGIN:
            return ids[:max_tokens]
        chars *= 2


def with_bos(tokenizer, ids: list[int]) -> list[int]:
    """Prepend BOS (EOS when there is no BOS) unless the sequence already starts with it."""
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None or (ids and ids[0] == start):
        return ids
    return [start, *ids]


def message_texts(corpus: Corpus) -> list[str]:
    """Texts as sequences see them: a message's line terminator is not part of the message."""
    if corpus.kind == "messages":
        return [t.rstrip("\r\n") for t in corpus.texts]
    return corpus.texts


def pad_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def packed_rows(tokenizer, corpus: Corpus, seq_len: int, max_tokens: int | None) -> list[list[int]]:
    """The corpus joined by its separator, tokenised once, cut into full rows of ``seq_len``."""
    ids = tokenize_prefix(tokenizer, SEPARATORS[corpus.kind].join(message_texts(corpus)), max_tokens)
    if len(ids) < seq_len:
        raise GluPruneError(
            f"corpus '{corpus.name}' has {len(ids)} tokens, fewer than one sequence of {seq_len}: "
            f"lower --seq-len or use a larger corpus"
        )
    return [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]


def message_rows(tokenizer, corpus: Corpus, seq_len: int, max_tokens: int | None) -> list[list[int]]:
    """One message per row, BOS first, truncated to ``seq_len``; stops once ``max_tokens`` are reached."""
    rows, total = [], 0
    for text in message_texts(corpus):
        ids = with_bos(tokenizer, tokenizer(text)["input_ids"])[:seq_len]
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        if len(ids) > 0:
            rows.append(ids)
            total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    return rows


def collate(rows: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` and ``attention_mask`` for a list of token rows."""
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        input_ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": mask}


def make_batches(tokenizer, corpus: Corpus, seq_len: int = 128, max_tokens: int | None = 8192,
                 batch_size: int = 8, packing: bool | None = None) -> list[dict[str, torch.Tensor]]:
    """Deterministic calibration batches of ``corpus``.

    Documents are packed by default and messages go one per row, padded; ``packing`` overrides.
    Asking for more tokens than the corpus has is not an error: a note goes to stderr.
    """
    if seq_len < 2:
        raise ConfigError("seq_len", seq_len, "is too short: use at least 2")
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be at least 1")
    packing = corpus.kind == "documents" if packing is None else packing
    build = packed_rows if packing else message_rows
    rows = build(tokenizer, corpus, seq_len, max_tokens)
    if not rows:
        raise GluPruneError(f"corpus '{corpus.name}' gave no tokens: check that it has text")
    got = sum(len(r) for r in rows)
    if max_tokens is not None and got < max_tokens:
        log.warning("corpus '%s' gives %d tokens, fewer than the %d asked; using all of them", corpus.name, got,
                    max_tokens)
    pad = pad_id(tokenizer)
    return [collate(rows[i : i + batch_size], pad) for i in range(0, len(rows), batch_size)]


def real_tokens(batches: list[dict]) -> int:
    """The tokens of ``batches`` that are not padding."""
    return sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel() for b in batches)
