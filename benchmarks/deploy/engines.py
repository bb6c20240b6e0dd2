"""Deployment speed measured one phase at a time: prefill, time to first token, decode.

A model is driven through an *engine* with two greedy operations: ``prefill(ids)`` runs the
prompt from an empty cache and returns the first generated token; ``step(token)`` feeds one
token through the cache and returns the next. Time to first token is one ``prefill`` (the
prompt's tokens in, one token out), never a whole generation; decode times a fixed number of
``step`` calls and never stops at EOS, so every model decodes the same number of tokens.
"""

from __future__ import annotations

import inspect
import random
import statistics
import time
from collections.abc import Iterable
from typing import Protocol


class Engine(Protocol):
    def prefill(self, ids: list[int]) -> int: ...

    def step(self, token: int) -> int: ...


class TorchEngine:
    """A transformers causal LM, batch 1, KV cache on; only the last position's logits are computed."""

    def __init__(self, model):
        self.model = model
        self.device = next(model.parameters()).device
        # transformers 5 renames past_key_values to cache (in the arguments and the output)
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.past = None

    def prefill(self, ids: list[int]) -> int:
        return self.forward(ids, None)

    def step(self, token: int) -> int:
        return self.forward([token], self.past)

    def forward(self, ids: list[int], past) -> int:
        import torch

        cache = {} if past is None else {self.cache_arg: past}
        with torch.inference_mode():
            out = self.model(input_ids=torch.tensor([ids], device=self.device), use_cache=True, logits_to_keep=1,
                             **cache)
        self.past = out[self.cache_arg] if self.cache_arg in out else out.past_key_values
        return int(out.logits[0, -1].argmax())


class LlamaCppEngine:
    """A ``llama_cpp.Llama``: ``eval`` fills its cache; only the last token's logits are computed."""

    def __init__(self, llm):
        self.llm = llm
        self.n_vocab = llm.n_vocab()

    def prefill(self, ids: list[int]) -> int:
        self.llm.reset()
        self.llm.eval(ids)
        return self.last_argmax()

    def step(self, token: int) -> int:
        self.llm.eval([token])
        return self.last_argmax()

    def last_argmax(self) -> int:
        return int(self.last_logits().argmax())

    def last_logits(self):
        import llama_cpp
        import numpy as np

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self.llm.ctx, -1), shape=(self.n_vocab,))


def prompt_ids(length: int, vocab_size: int, seed: int = 0, low: int = 3) -> list[int]:
    """``length`` token ids drawn uniformly from [low, vocab_size), the same for every model and engine."""
    rng = random.Random(f"{seed}-{length}")
    return [rng.randrange(low, vocab_size) for _ in range(length)]


def first_token(engine: Engine, ids: list[int]) -> tuple[float, int]:
    """Seconds from the prompt ``ids`` to its first generated token, and that token."""
    start = time.perf_counter()
    token = engine.prefill(ids)
    return time.perf_counter() - start, token


def decode(engine: Engine, ids: list[int], new_tokens: int) -> tuple[float, list[int]]:
    """Seconds for ``new_tokens`` decode steps after the prefill of ``ids`` (untimed), and the tokens
    they produced; EOS does not stop it."""
    token = engine.prefill(ids)
    produced = []
    start = time.perf_counter()
    for _ in range(new_tokens):
        token = engine.step(token)
        produced.append(token)
    return time.perf_counter() - start, produced


def measure_turn(engine: Engine, prompts: dict[int, list[int]], decode_prompt: list[int], new_tokens: int,
                 warmup_tokens: int = 8) -> dict:
    """One measurement of every figure after a short warm-up: prefill tokens/s and time to first token
    (ms) for each prompt length, and decode tokens/s over ``new_tokens`` steps."""
    decode(engine, decode_prompt[:warmup_tokens], warmup_tokens)
    figures: dict = {"prefill_tps": {}, "ttft_ms": {}}
    for length, ids in sorted(prompts.items()):
        seconds, _ = first_token(engine, ids)
        figures["prefill_tps"][length] = length / seconds
        figures["ttft_ms"][length] = seconds * 1000
    seconds, _ = decode(engine, decode_prompt, new_tokens)
    figures["decode_tps"] = new_tokens / seconds
    return figures


def median_figures(turns: list[dict]) -> dict:
    """The median of each figure over the turns (figures nested one level by prompt length)."""
    out: dict = {}
    for key, first in turns[0].items():
        if isinstance(first, dict):
            out[key] = {k: statistics.median(t[key][k] for t in turns) for k in first}
        else:
            out[key] = statistics.median(t[key] for t in turns)
    return out


def generated_lengths(model, tokenizer, messages: Iterable[str], max_new_tokens: int,
                      batch_size: int = 16) -> list[int]:
    """New tokens a model writes for each message under its chat template, greedy, stopping at EOS
    (counted) or at ``max_new_tokens``."""
    import torch

    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(eos)
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": m.strip()}], tokenize=False,
                                           add_generation_prompt=True) for m in messages]
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    lengths = []
    try:
        for i in range(0, len(texts), batch_size):
            batch = tokenizer(texts[i:i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.inference_mode():
                out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=list(eos),
                                     pad_token_id=pad)
            lengths.extend(length_to_eos(row.tolist(), eos) for row in out[:, batch["input_ids"].shape[1]:])
    finally:
        tokenizer.padding_side = side
    return lengths


def length_to_eos(tokens: list[int], eos: set[int]) -> int:
    """Tokens up to and including the first EOS; all of them when there is none."""
    return next((i + 1 for i, t in enumerate(tokens) if t in eos), len(tokens))


# --- table maths -----------------------------------------------------------------------------------------

def speedup(value: float, base: float, lower_is_better: bool = False) -> float:
    """How many times faster than the base a figure is (for times: base / value)."""
    return base / value if lower_is_better else value / base


def predicted(base_params: int, params: int) -> float:
    """The speed-up a workload proportional to the parameter count predicts."""
    return base_params / params


def kept_fraction(sizes: list[int], base_sizes: list[int]) -> float:
    """Kept GLU neurons over the base model's, all layers together."""
    return sum(sizes) / sum(base_sizes)
