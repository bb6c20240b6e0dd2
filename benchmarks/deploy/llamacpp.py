"""A GGUF file run in llama.cpp (through llama-cpp-python, ``pip install glu-prune[deploy]``): its
logits on token ids, its tokens of a text, and its perplexity by the protocol (the windows of
``calibrate.perplexity``).

llama.cpp runs in a child process (:mod:`benchmarks.deploy.llamacpp_child`) that imports neither
torch nor this project: ggml's threads and OpenMP runtime never share a process with torch's, and a
crash in the engine is reported as an error naming the signal instead of ending the caller.
"""

from __future__ import annotations

import importlib.util
import json
import math
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from calibrate.corpora import Corpus
from calibrate.errors import GluPruneError
from calibrate.perplexity import PerplexityResult, sequences_for


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def in_llama_cpp(gguf_path: str | Path, n_ctx: int, f32_cache: bool, threads: int | None, **asked) -> dict:
    """The answer of :mod:`benchmarks.deploy.llamacpp_child` to ``asked`` about the model at
    ``gguf_path`` (a context of ``n_ctx`` tokens; its KV cache in float32 with ``f32_cache``)."""
    if not llama_cpp_available():
        raise GluPruneError("llama.cpp is not installed: pip install 'glu-prune[deploy]' (llama-cpp-python)")
    with tempfile.TemporaryDirectory(prefix="glu-prune-llamacpp-") as folder:
        request, answer = Path(folder) / "request.json", Path(folder) / "answer.npz"
        request.write_text(json.dumps({"path": str(gguf_path), "n_ctx": n_ctx, "f32_cache": f32_cache,
                                       "threads": threads, **asked}))
        done = subprocess.run([sys.executable, "-m", "benchmarks.deploy.llamacpp_child", str(request), str(answer)],
                              capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
        if done.returncode < 0:
            raise GluPruneError(f"llama.cpp crashed on {gguf_path} ({signal.Signals(-done.returncode).name}): "
                                f"{done.stderr.strip()[-400:]}")
        if done.returncode != 0:
            raise GluPruneError(f"llama.cpp could not load {gguf_path}: {done.stderr.strip()[-400:]}")
        with np.load(answer) as result:
            return {k: result[k] for k in result.files}


def llama_cpp_logits(gguf_path: str | Path, ids: list[int], f32_cache: bool = True,
                     threads: int | None = None) -> np.ndarray:
    """Logits of the GGUF model at every position of ``ids``, one context, float32 (len, vocab)."""
    return in_llama_cpp(gguf_path, len(ids), f32_cache, threads, what="logits", sequences=[list(ids)])["logits"]


def llama_cpp_tokens(gguf_path: str | Path, text: str) -> list[int]:
    """The token ids llama.cpp's tokenizer of the GGUF file gives ``text`` (no BOS)."""
    return in_llama_cpp(gguf_path, 64, False, None, text=text)["tokens"].tolist()


def llama_cpp_perplexity(gguf_path: str | Path, tokenizer, corpus: Corpus, seq_len: int = 512,
                         max_tokens: int | None = None, max_docs: int | None = None, f32_cache: bool = False,
                         threads: int | None = None) -> PerplexityResult:
    """Perplexity of the GGUF model in llama.cpp on ``corpus``, over exactly the sequences
    :func:`calibrate.perplexity.perplexity` evaluates (same tokenizer, windows and budget), each in
    a fresh context. llama.cpp's default float16 KV cache unless ``f32_cache``."""
    sequences = sequences_for(tokenizer, corpus, seq_len, max_tokens, max_docs)
    if not sequences:
        raise GluPruneError(f"corpus '{corpus.name}' gives no sequence of 2 or more tokens to evaluate")
    result = in_llama_cpp(gguf_path, max(len(s) for s in sequences), f32_cache, threads, what="nll",
                          sequences=[list(s) for s in sequences])
    count = int(result["count"].sum())
    mean = float(result["nll"].sum()) / count
    if not math.isfinite(mean):
        raise GluPruneError(f"llama.cpp gave non-finite logits for {gguf_path}")
    seconds = float(result["seconds"])
    return PerplexityResult(math.exp(mean), mean, count, len(sequences), seconds, count / seconds)
