"""llama.cpp's side of :mod:`benchmarks.deploy.llamacpp`, run in a process of its own:

    python -m benchmarks.deploy.llamacpp_child request.json answer.npz

It imports only numpy and llama_cpp (never torch, whose OpenMP runtime and threads would share
the process with ggml's), reads the request (``path``, ``n_ctx``, ``f32_cache``, ``threads`` and
``sequences`` of token ids, or ``text`` to tokenize) and writes the answer: the logits of a single
sequence (``logits``), each sequence's summed next-token NLL and predicted-token count (``nll``,
``count``, ``seconds``), or the tokens of ``text`` (``tokens``).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np

GGML_TYPE_F32 = 0  # llama.cpp's type id of float32 (its KV cache is float16 unless asked)


def window_logits(llm, ids: list[int]) -> np.ndarray:
    """The logits llama.cpp gives at every position of ``ids`` (a fresh context), float32 (len, vocab)."""
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def window_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Summed next-token NLL of ``ids[1:]`` from the logits at ``ids[:-1]``, in float64."""
    z = logits[:-1].astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return float((log_norm - z[np.arange(len(ids) - 1), ids[1:]]).sum())


def answer(request: dict) -> dict[str, np.ndarray]:
    """What ``request`` asks of the model at ``request["path"]``."""
    from llama_cpp import Llama

    cache = dict(type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32) if request["f32_cache"] else {}
    n_ctx = request["n_ctx"]
    llm = Llama(request["path"], n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                n_threads=request["threads"], verbose=False, **cache)
    try:
        if "text" in request:
            return {"tokens": np.array(llm.tokenize(request["text"].encode(), add_bos=False), dtype=np.int64)}
        sequences = request["sequences"]
        if request["what"] == "logits":
            return {"logits": window_logits(llm, sequences[0])}
        start = time.perf_counter()
        nll = [window_nll(window_logits(llm, ids), ids) for ids in sequences]
        return {"nll": np.array(nll), "count": np.array([len(s) - 1 for s in sequences]),
                "seconds": np.array(time.perf_counter() - start)}
    finally:
        llm.close()


def main(argv: list[str]) -> int:
    request_path, answer_path = argv
    with open(request_path) as f:
        request = json.load(f)
    try:
        result = answer(request)
    except ValueError as exc:  # llama-cpp-python's "Failed to load model from file"
        print(str(exc), file=sys.stderr)
        return 3
    with open(answer_path, "wb") as f:
        np.savez(f, **result)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
