"""A GGUF file run in llama.cpp (through llama-cpp-python, ``pip install glu-prune[deploy]``): its
logits on token ids, and its perplexity by the protocol (the windows of ``calibrate.perplexity``)."""

from __future__ import annotations

import importlib.util
import math
import time
from pathlib import Path

import numpy as np

from calibrate.corpora import Corpus
from calibrate.errors import GluPruneError
from calibrate.perplexity import PerplexityResult, sequences_for

GGML_TYPE_F32 = 0  # llama.cpp's type id of float32 (its KV cache is float16 unless asked)


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def open_gguf(path: str | Path, n_ctx: int, f32_cache: bool = False, threads: int | None = None):
    """A ``llama_cpp.Llama`` keeping every position's logits; ``f32_cache``: its KV cache in float32."""
    if not llama_cpp_available():
        raise GluPruneError("llama.cpp is not installed: pip install 'glu-prune[deploy]' (llama-cpp-python)")
    from llama_cpp import Llama

    cache = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if f32_cache else {}
    try:
        return Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True, n_threads=threads,
                     verbose=False, **cache)
    except ValueError as exc:
        raise GluPruneError(f"llama.cpp could not load {path} ({exc})") from exc


def window_logits(llm, ids: list[int]) -> np.ndarray:
    """The logits llama.cpp gives at every position of ``ids`` (a fresh context), float32 (len, vocab)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def llama_cpp_logits(gguf_path: str | Path, ids: list[int], f32_cache: bool = True,
                     threads: int | None = None) -> np.ndarray:
    """Logits of the GGUF model at every position of ``ids``, one context, float32 (len, vocab)."""
    llm = open_gguf(gguf_path, n_ctx=len(ids), f32_cache=f32_cache, threads=threads)
    try:
        return window_logits(llm, ids)
    finally:
        llm.close()


def window_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Summed next-token NLL of ``ids[1:]`` from the logits at ``ids[:-1]``, in float64."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(ids) - 1), ids[1:]]).sum())


def llama_cpp_perplexity(gguf_path: str | Path, tokenizer, corpus: Corpus, seq_len: int = 512,
                         max_tokens: int | None = None, max_docs: int | None = None, f32_cache: bool = False,
                         threads: int | None = None) -> PerplexityResult:
    """Perplexity of the GGUF model in llama.cpp on ``corpus``, over exactly the sequences
    :func:`calibrate.perplexity.perplexity` evaluates (same tokenizer, windows and budget), each in
    a fresh context. llama.cpp's default float16 KV cache unless ``f32_cache``."""
    sequences = sequences_for(tokenizer, corpus, seq_len, max_tokens, max_docs)
    if not sequences:
        raise GluPruneError(f"corpus '{corpus.name}' gives no sequence of 2 or more tokens to evaluate")
    llm = open_gguf(gguf_path, n_ctx=max(len(s) for s in sequences), f32_cache=f32_cache, threads=threads)
    total, count = 0.0, 0
    start = time.perf_counter()
    try:
        for ids in sequences:
            total += window_nll(window_logits(llm, ids), ids)
            count += len(ids) - 1
    finally:
        llm.close()
    seconds = time.perf_counter() - start
    mean = total / count
    if not math.isfinite(mean):
        raise GluPruneError(f"llama.cpp gave non-finite logits for {gguf_path}")
    return PerplexityResult(math.exp(mean), mean, count, len(sequences), seconds, count / seconds)
