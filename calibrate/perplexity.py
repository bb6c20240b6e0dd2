"""Perplexity by the protocol of PROTOCOL.md: documents in non-overlapping windows, messages one by one."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from calibrate.batches import collate, message_texts, pad_id, tokenize_prefix, with_bos
from calibrate.errors import ConfigError, GluPruneError
from calibrate.progress import showing, shown

if TYPE_CHECKING:
    from calibrate.corpora import Corpus


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float
    tokens: int
    sequences: int
    seconds: float
    tokens_per_second: float

    def as_dict(self) -> dict:
        return asdict(self)


def document_windows(tokenizer, texts: list[str], seq_len: int, max_tokens: int | None) -> list[list[int]]:
    """``"\\n\\n".join(texts)`` tokenised once, first ``max_tokens``, cut into windows of ``seq_len``.

    The last, shorter window is kept when it has at least 2 tokens.
    """
    ids = tokenize_prefix(tokenizer, "\n\n".join(texts), max_tokens)
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    return [w for w in windows if len(w) >= 2]


def message_sequences(tokenizer, texts: list[str], max_docs: int | None, max_tokens: int | None,
                      seq_len: int | None = None) -> list[list[int]]:
    """Each message on its own with BOS prepended; the first ``max_docs`` messages."""
    sequences, predicted = [], 0
    for text in texts[:max_docs]:
        ids = with_bos(tokenizer, tokenizer(text)["input_ids"])
        if seq_len is not None:
            ids = ids[:seq_len]
        if len(ids) < 2:
            continue
        sequences.append(ids)
        predicted += len(ids) - 1
        if max_tokens is not None and predicted >= max_tokens:
            break
    return sequences


def sequences_for(tokenizer, corpus: Corpus, seq_len: int, max_tokens: int | None,
                  max_docs: int | None) -> list[list[int]]:
    if corpus.kind == "messages":
        return message_sequences(tokenizer, message_texts(corpus), max_docs, max_tokens, seq_len)
    texts = corpus.texts[:max_docs] if max_docs is not None else corpus.texts
    return document_windows(tokenizer, texts, seq_len, max_tokens)


def sequence_nll(model, batch: dict[str, torch.Tensor]) -> tuple[float, int]:
    """Summed NLL (float64) and count of predicted tokens; every real token but the first is predicted."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["input_ids"][:, 1:]
    keep = batch["attention_mask"][:, 1:].bool()
    losses = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return losses[keep].double().sum().item(), int(keep.sum())


def perplexity(model, tokenizer, corpus: Corpus, seq_len: int = 512, max_tokens: int | None = None,
               max_docs: int | None = None, batch_size: int = 1) -> PerplexityResult:
    """Perplexity of ``model`` on ``corpus`` (see PROTOCOL.md); padding never counts. A progress bar
    unless :func:`calibrate.progress.showing` turns it off."""
    if seq_len < 2:
        raise ConfigError("seq_len", seq_len, "is too short: use at least 2")
    if batch_size < 1:
        raise ConfigError("batch_size", batch_size, "must be at least 1")
    sequences = sequences_for(tokenizer, corpus, seq_len, max_tokens, max_docs)
    if not sequences:
        raise GluPruneError(f"corpus '{corpus.name}' gives no sequence of 2 or more tokens to evaluate")
    device = next(model.parameters()).device
    pad = pad_id(tokenizer)
    total_nll, total_tokens = 0.0, 0
    start = time.perf_counter()
    bar = tqdm(total=sum(len(s) - 1 for s in sequences), unit="tok", desc=f"perplexity {corpus.name}",
               disable=not shown(), leave=False)
    by_length = sorted(sequences, key=len, reverse=True)  # less padding; the token-weighted sum is unchanged
    with torch.inference_mode():
        for i in range(0, len(by_length), batch_size):
            batch = {k: v.to(device) for k, v in collate(by_length[i : i + batch_size], pad).items()}
            nll, count = sequence_nll(model, batch)
            total_nll += nll
            total_tokens += count
            bar.update(count)
    bar.close()
    seconds = time.perf_counter() - start
    mean = total_nll / total_tokens
    if not math.isfinite(mean):
        raise GluPruneError("perplexity is not finite (NaN/inf logits): evaluate in --dtype float32 or bfloat16")
    return PerplexityResult(math.exp(mean), mean, total_tokens, len(sequences), seconds, total_tokens / seconds)


def protocol_perplexity(model, tokenizer, corpus: Corpus, eval_tokens: int = 8192, eval_docs: int = 400,
                        seq_len: int = 512, batch_size: int = 4) -> PerplexityResult:
    """PROTOCOL.md's reference measurement: the first ``eval_tokens`` tokens of a document corpus,
    or the first ``eval_docs`` messages of a message corpus (no progress bar unless
    :func:`calibrate.progress.showing` asks for one)."""
    messages = corpus.kind == "messages"
    with showing(shown(default=False)):
        return perplexity(model, tokenizer, corpus, seq_len=seq_len, max_tokens=None if messages else eval_tokens,
                          max_docs=eval_docs if messages else None, batch_size=batch_size)
