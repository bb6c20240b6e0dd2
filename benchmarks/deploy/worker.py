"""One measurement turn in a fresh process: load one model in one engine, measure it, print JSON.

    python -m benchmarks.deploy.worker '{"runtime": "llama.cpp", "path": "m.f16.gguf", ...}'

A process of its own per turn gives every variant the same start and its own peak memory
(``peak_bytes``: the process's peak resident set; ``floor_bytes``: its resident set after the
engine's libraries were imported, before the model was loaded).
"""

from __future__ import annotations

import json
import sys

from benchmarks.deploy.engines import LlamaCppEngine, TorchEngine, measure_turn, prompt_ids
from benchmarks.measures import peak_bytes, status_bytes


def load_engine(spec: dict):
    """The engine of ``spec`` and the process's resident bytes just before the model was loaded."""
    threads = spec["threads"]
    if spec["runtime"] == "transformers":
        import torch

        from calibrate.models import DTYPES, load_pruned

        torch.set_num_threads(threads)
        floor = status_bytes("VmRSS")
        return TorchEngine(load_pruned(spec["path"], dtype=DTYPES[spec["dtype"]], device="cpu")), floor
    from llama_cpp import Llama

    floor = status_bytes("VmRSS")
    llm = Llama(model_path=spec["path"], n_ctx=spec["n_ctx"], n_threads=threads, n_threads_batch=threads,
                logits_all=False, verbose=False)
    return LlamaCppEngine(llm), floor


def run_turn(spec: dict) -> dict:
    engine, floor = load_engine(spec)
    vocab, seed = spec["vocab_size"], spec["seed"]
    prompts = {n: prompt_ids(n, vocab, seed) for n in spec["prompt_lengths"]}
    figures = measure_turn(engine, prompts, prompt_ids(spec["decode_prompt"], vocab, seed), spec["new_tokens"])
    return {**figures, "peak_bytes": peak_bytes(), "floor_bytes": floor}


def main() -> None:
    print(json.dumps(run_turn(json.loads(sys.argv[1]))))


if __name__ == "__main__":
    main()
