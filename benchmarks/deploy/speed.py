"""Deployment figures of a model: parameters, size, prefill and decode throughput, time to first token."""

from __future__ import annotations

import statistics
import time

import torch

from benchmarks.measures import MIB, parameter_bytes, parameter_count


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on ``device`` is done (CUDA runs it asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    """``device`` as speed figures depend on it: the GPU's name on CUDA."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def timed(fn, repeats: int, device: torch.device) -> float:
    """Median wall time of ``fn()`` on ``device`` over ``repeats`` runs, after one warm-up."""
    fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_speed(model, batch: int = 8, prompt_len: int = 128, new_tokens: int = 32, repeats: int = 3,
                  vocab_limit: int = 1000) -> dict:
    """Prefill tokens/s on a (batch, prompt_len) batch, decode tokens/s and time to first token at batch 1."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(0)
    high = min(vocab_limit, model.config.vocab_size)
    prompts = torch.randint(3, high, (batch, prompt_len), generator=generator).to(device)
    one = prompts[:1]

    def prefill():
        model(input_ids=prompts, use_cache=False)

    def first_token():
        model(input_ids=one, use_cache=True).logits[:, -1].argmax(-1)

    def generate():
        model.generate(one, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=model.config.eos_token_id if model.config.pad_token_id is None
                       else model.config.pad_token_id)

    with torch.inference_mode():
        prefill_s, ttft_s, gen_s = (timed(fn, repeats, device) for fn in (prefill, first_token, generate))
    return {
        "parameters": parameter_count(model),
        "size_mb": round(parameter_bytes(model) / MIB, 1),
        "prefill_tokens_per_second": batch * prompt_len / prefill_s,
        "decode_tokens_per_second": (new_tokens - 1) / max(gen_s - ttft_s, 1e-9),
        "ttft_ms": ttft_s * 1000,
    }
