"""The per-layer costs that docs/scale.md's Llama-3.1-8B / 70B plan is extrapolated from, measured here.

(a) SmolLM2-135M built empty and filled one decoder layer at a time, as ``glu-prune calibrate
--offload`` runs it: per decoder layer, the time to fill it from the checkpoint, its calibration
pass over the captured batches without and with the float64 x xᵀ recorder, and a bare float64
x xᵀ update (``addmm``, the recorder's own), each per 1000 tokens. (b) One float64 Cholesky
factorisation and solve, :func:`benchmarks.reference.ridge_solve` (the refit's inner step), of a
synthetic positive-definite matrix at each size, with a Llama-shaped right-hand side (hidden =
2/7 × size), at each thread count; a cubic law fitted and extrapolated. (c) One layer's whole
``lstsq`` refit (:func:`pruning.registry.reconstruct_layer`, the ridge grid chosen on a held-out
slice): on SmolLM2's real layer 0 and on synthetic Llama-shaped statistics; time and peak memory
above its inputs. (d) The 8B/70B table of docs/scale.md, from (a)-(c) and stated GPU assumptions.

    OMP_NUM_THREADS=1 python -m benchmarks.studies.scale.costs --data-dir ../shared/data
        [--tokens 4096] [--layers 3] [--sizes 1536,4096,8192,14336] [--threads 1,2]
        [--refit-sizes 2048,4096,6144] [--refit-threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import ExitStack

import torch

from benchmarks.measures import reset_peak, rss_mib
from benchmarks.reference import ridge_solve
from benchmarks.studies.scale.plan import (
    LLAMA_8B,
    LLAMA_70B,
    SHAPES,
    SMOLLM2_135M,
    PowerLaw,
    fit_cubic,
    kept,
    offload_peak_bytes,
)
from benchmarks.studies.scale.reference import OLD_TOKEN_BLOCK
from calibrate.batches import make_batches
from calibrate.corpora import load_corpus
from calibrate.glu import decoder, glu_layers
from calibrate.layerwise import LayerRunner, capture_inputs
from calibrate.offload import offload_model
from calibrate.resources import human_bytes
from calibrate.run import split_holdout
from calibrate.stats import LayerStats
from pruning.reconstruct import RIDGE_GRID
from pruning.registry import reconstruct_layer

GIB = 1024**3
H100_BF16 = 989e12  # dense bf16 peak, FLOP/s (H100 SXM)
H100_FP64 = 67e12  # FP64 tensor-core peak, FLOP/s (H100 SXM): the x xᵀ update runs in float64
UTILISATION = 0.4  # assumed share of the peak reached


def timed(fn, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return time.perf_counter() - start, out


PEAK = [0.0]  # the largest peak resident MiB seen before any reset


def peak_above(fn, *args, **kwargs) -> tuple[float, float, object]:
    """(seconds, peak resident MiB above the resident memory at the call, result)."""
    PEAK[0] = max(PEAK[0], rss_mib("VmHWM"))
    reset_peak()
    before = rss_mib("VmRSS")
    seconds, out = timed(fn, *args, **kwargs)
    PEAK[0] = max(PEAK[0], rss_mib("VmHWM"))
    return seconds, rss_mib("VmHWM") - before, out


def layer_costs(model_name: str, data_dir: str | None, tokens: int, seq_len: int, layers: int) -> dict:
    """Per decoder layer of the offloaded model: fill time, pass without and with x xᵀ, per 1k tokens."""
    model, loader, tokenizer = offload_model(model_name, torch.device("cpu"), torch.float32)
    corpus = load_corpus("wikitext2", part="calibration", data_dir=data_dir)
    batches = make_batches(tokenizer, corpus, seq_len=seq_len, max_tokens=tokens, batch_size=1)
    fit, held = split_holdout(batches, 0.25)
    with loader.loaded(decoder(model).get_input_embeddings()):
        groups = [capture_inputs(model, fit), capture_inputs(model, held)]
    runner = LayerRunner(model, groups)
    seen = sum(b.tokens for g in groups for b in g)
    rows, real = [], None
    for index in range(layers):
        with ExitStack() as stack:
            fill, _ = timed(stack.enter_context, loader.loaded(runner.layers[index]))
            plain = min(timed(runner.record, index, False, False)[0] for _ in range(2))
            moment = min(timed(runner.record, index, True, False)[0] for _ in range(2))
            if index == 0:
                real = (glu_layers(model, [0])[0].down.weight.detach().clone(), *runner.record(0, True, False))
            runner.advance(index)
        rows.append((index, fill, plain, moment))
    size = glu_layers(model, [0])[0].intermediate_size
    per_k = 1000 / seen
    return {"tokens": seen, "size": size, "rows": [(i, f, p * per_k, m * per_k) for i, f, p, m in rows],
            "real": real}


def bare_moment_seconds_per_k(size: int, tokens: int = OLD_TOKEN_BLOCK, repeats: int = 3) -> float:
    """One float32 → float64 conversion and x xᵀ addmm of ``tokens`` rows, per 1000 tokens."""
    x = torch.randn(tokens, size)
    s = torch.zeros(size, size, dtype=torch.float64)

    def update():
        block = x.double()
        s.addmm_(block.T, block)

    return min(timed(update)[0] for _ in range(repeats)) * 1000 / tokens


def spd(n: int, seed: int = 0, rank: int = 256) -> torch.Tensor:
    """A synthetic positive-definite float64 matrix: a rank-``rank`` Gram matrix plus a diagonal."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, rank, dtype=torch.float64, generator=g)
    s = x @ x.T
    s.diagonal().add_(float(rank))
    return s


def llama_hidden(size: int) -> int:
    return round(size * 2 / 7)  # Llama-3.1: 4096 / 14336, 8192 / 28672


def solve_costs(sizes: list[int], threads: list[int]) -> dict[tuple[int, int], tuple[float, float]]:
    """{(size, threads): (seconds, peak MiB above inputs)} of one ridge_solve."""
    out = {}
    for n in sizes:
        s = spd(n)
        target = torch.randn(llama_hidden(n), n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        ridge = 1e-2 * s.diagonal().mean()
        for t in threads:
            torch.set_num_threads(t)
            seconds, peak, _ = peak_above(ridge_solve, target, s, ridge, 1e-2)
            out[(n, t)] = (seconds, peak)
            print(f"  ridge_solve size {n:>6}, hidden {llama_hidden(n):>5}, {t} thread(s): {seconds:8.2f} s, "
                  f"peak {peak:7.0f} MiB above inputs ({peak * 2**20 / (n * n * 8):.2f} × size² float64)",
                  flush=True)
        del s, target
    return out


def synthetic_stats(size: int, seed: int) -> LayerStats:
    zero = torch.zeros(size, dtype=torch.float64)
    g = torch.Generator().manual_seed(seed)
    return LayerStats(1, torch.randn(size, dtype=torch.float64, generator=g), zero.clone(), zero.clone(), zero.clone(),
                      spd(size, seed))


def refit_costs(sizes: list[int], threads: list[int], ratio: float) -> dict[tuple[int, int], tuple[float, float]]:
    """{(size, threads): (seconds, peak MiB above inputs)} of reconstruct_layer on synthetic Llama-shaped stats."""
    out = {}
    for n in sizes:
        fit, held = synthetic_stats(n, 2), synthetic_stats(n, 3)
        weight = torch.randn(llama_hidden(n), n, generator=torch.Generator().manual_seed(4))
        keep = torch.arange(kept(n, ratio))
        for t in threads:
            torch.set_num_threads(t)
            seconds, peak, _ = peak_above(reconstruct_layer, "lstsq", weight, keep, fit, held)
            out[(n, t)] = (seconds, peak)
            print(f"  reconstruct_layer size {n:>5} (keeps {len(keep)}, hidden {llama_hidden(n)}), {t} thread(s): "
                  f"{seconds:7.2f} s, peak {peak:6.0f} MiB above inputs ({peak * 2**20 / (n * n * 8):.2f} × size² "
                  f"float64)", flush=True)
    return out


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def plan(cpu_forward_rate: float, cpu_moment_rate: float, solve_laws: dict[int, PowerLaw], factor: float,
         ratio: float, tokens: int, refit_extra: float) -> None:
    """docs/scale.md's table: sizes from the shapes; times from the measured rates and laws."""
    gpu_forward, gpu_moment = H100_BF16 * UTILISATION, H100_FP64 * UTILISATION
    print(f"\n(d) plan, {tokens} calibration tokens for the memory, ratio {ratio}, weights and activations bf16")
    print("| | SmolLM2-135M | Llama-3.1-8B | Llama-3.1-70B |\n| --- | ---: | ---: | ---: |")

    def row(label, fn):
        print(f"| {label} | " + " | ".join(fn(s) for s in SHAPES) + " |")

    row("layers × intermediate (hidden)", lambda s: f"{s.layers} × {s.intermediate} ({s.hidden})")
    row("parameters", lambda s: f"{s.params / 1e9:.2f} B")
    row("weights bf16 / f32", lambda s: f"{gb(2 * s.params)} / {gb(4 * s.params)}")
    row("x xᵀ float64: one layer / all layers", lambda s: f"{gb(s.moment_bytes)} / {gb(s.layers * s.moment_bytes)}")
    row("statistics file without / with second moments",
        lambda s: f"{gb(s.stats_file_bytes(False))} / {gb(s.stats_file_bytes(True))}")
    for refit in (False, True):
        peak = {s.name: offload_peak_bytes(s, tokens, 2, 8 * 128, refit_extra, ratio, refit) for s in SHAPES}
        row(f"offloaded prune peak, {'lstsq refit' if refit else 'no refit'}",
            lambda s, p=peak: gb(p[s.name]["total"]))
    row("refitted down_proj held (float64)", lambda s: gb(s.refitted_down_bytes(ratio)))
    row("calibration forward, FLOP per token", lambda s: f"{s.body_flops_per_token / 1e9:.2f} G")
    row("x xᵀ update, FLOP per token", lambda s: f"{s.moment_flops_per_token / 1e9:.2f} G")
    million = 1e6
    row("CPU (this machine, 1 thread): forward / + x xᵀ per 1M tokens",
        lambda s: f"{duration(s.body_flops_per_token * million / cpu_forward_rate)} / "
                  f"{duration(s.moment_flops_per_token * million / cpu_moment_rate)}")
    row("1 H100 (assumed): forward / + x xᵀ per 1M tokens",
        lambda s: f"{duration(s.body_flops_per_token * million / gpu_forward)} / "
                  f"{duration(s.moment_flops_per_token * million / gpu_moment)}")
    row("8 H100 under torchrun: forward / + x xᵀ per 1M tokens",
        lambda s: f"{duration(s.body_flops_per_token * million / gpu_forward / 8)} / "
                  f"{duration(s.moment_flops_per_token * million / gpu_moment / 8)}")
    for t, law in sorted(solve_laws.items()):
        def refit(s, law=law):
            low, high = sorted(factor * f(kept(s.intermediate, ratio)) for f in (law.free, law))
            return f"{duration(low)}-{duration(high)} / {duration(low * s.layers)}-{duration(high * s.layers)}"

        row(f"lstsq refit (CPU, {t} thread(s)): one layer / all layers", refit)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tokens", type=int, default=4096, help="calibration tokens for (a)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--layers", type=int, default=3, help="decoder layers measured in (a)")
    parser.add_argument("--sizes", default="1536,4096,8192,14336", help="ridge_solve sizes for (b)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--refit-sizes", default="2048,4096,6144", help="synthetic reconstruct_layer sizes for (c)")
    parser.add_argument("--refit-threads", default="1", help="thread counts for (c)")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--plan-tokens", type=int, default=65536, help="calibration tokens for (d)'s memory")
    args = parser.parse_args(argv)
    threads = [int(t) for t in args.threads.split(",")]
    start = time.perf_counter()
    torch.set_num_threads(threads[0])

    print(f"(a) {args.model} offloaded, float32, {threads[0]} thread(s), per 1000 tokens:", flush=True)
    costs = layer_costs(args.model, args.data_dir, args.tokens, args.seq_len, args.layers)
    print(f"  {costs['tokens']} tokens (fit and held-out slice) through layers 0-{args.layers - 1}, "
          f"intermediate {costs['size']}")
    print(f"  {'layer':>5} {'fill s':>8} {'pass s/1k':>10} {'with x xᵀ s/1k':>15} {'x xᵀ share':>11}")
    for i, fill, plain, moment in costs["rows"]:
        print(f"  {i:>5} {fill:8.3f} {plain:10.3f} {moment:15.3f} {(moment - plain) / moment:11.0%}")
    plain = statistics.median(r[2] for r in costs["rows"])
    moment = statistics.median(r[3] for r in costs["rows"])
    bare = bare_moment_seconds_per_k(costs["size"])
    forward_rate = SMOLLM2_135M.layer_params * 2 * 1000 / plain
    moment_rate = 2 * costs["size"] ** 2 * 1000 / bare
    print(f"  median: pass {plain:.3f} s/1k tokens ({forward_rate / 1e9:.1f} GFLOP/s at 2 × layer parameters "
          f"per token), with x xᵀ {moment:.3f} s/1k (+{moment - plain:.3f}); bare float64 x xᵀ update {bare:.3f} "
          f"s/1k ({moment_rate / 1e9:.1f} GFLOP/s)")

    weight, fit, held = costs["real"]
    keep = fit.mean_abs.argsort(descending=True)[:kept(costs["size"], args.ratio)].sort().values
    seconds, peak, (_, _, chosen) = peak_above(reconstruct_layer, "lstsq", weight, keep, fit, held)
    print(f"  real layer 0 refit (lstsq, {len(RIDGE_GRID)} ridges, keeps {len(keep)} of {costs['size']}): "
          f"{seconds:.2f} s, peak {peak:.0f} MiB above inputs, ridge {chosen['ridge']:g}", flush=True)

    print("(b) one Cholesky factorisation + solve (benchmarks.reference.ridge_solve), float64:", flush=True)
    solves = solve_costs([int(n) for n in args.sizes.split(",")], threads)
    print("(c) one layer's lstsq refit (pruning.registry.reconstruct_layer), synthetic Llama-shaped "
          f"statistics, ratio {args.ratio}:", flush=True)
    refits = refit_costs([int(n) for n in args.refit_sizes.split(",")],
                         [int(t) for t in args.refit_threads.split(",")], args.ratio)

    print("laws: the cubic t = c · n³ through the largest measured size (an upper bound while the speed still "
          "rises with the size) and the free log-log fit t = c' · n^p (the lower bound; ridge_solve on sizes ≥ 4096)")
    refit_threads = sorted({t for _, t in refits})
    rpoints = [(n, s) for (n, tt), (s, _) in refits.items() if tt == refit_threads[0]]
    refit_law = fit_cubic(*map(list, zip(*rpoints)))
    largest = max(n for n, _ in rpoints)
    print(f"  reconstruct_layer, {refit_threads[0]} thread(s): p = {refit_law.exponent:.2f}; cubic: 14336: "
          f"{refit_law(14336):.0f} s, 28672: {refit_law(28672):.0f} s")
    laws, factor = {}, None
    for t in threads:
        points = [(n, s) for (n, tt), (s, _) in solves.items() if tt == t]
        points = [(n, s) for n, s in points if n >= 4096] if sum(n >= 4096 for n, _ in points) > 1 else points
        law = laws[t] = fit_cubic(*map(list, zip(*points)))
        if factor is None:  # the first thread count's: one refit in units of one solve at its kept size
            factor = dict(rpoints)[largest] / law.free(kept(largest, args.ratio))
        print(f"  ridge_solve, {t} thread(s): p = {law.exponent:.2f}; 28672: {law.free(28672):.0f} to "
              f"{law(28672):.0f} s")
    print(f"  one refit = {factor:.1f} solves at its kept size (reconstruct_layer at {largest} / ridge_solve at "
          f"{kept(largest, args.ratio)} from the free law, {threads[0]} thread(s))")
    for t, law in laws.items():
        for shape in (LLAMA_8B, LLAMA_70B):
            k = kept(shape.intermediate, args.ratio)
            low, high = sorted(factor * f(k) for f in (law.free, law))
            print(f"  {shape.name} layer refit ({t} thread(s)): {factor:.1f} × ridge_solve at {k}: "
                  f"{low:.0f} to {high:.0f} s")
    extra = max(p for _, p in refits.values()) * 2**20 / max(n * n * 8 for n, _ in refits)
    plan(forward_rate, moment_rate, laws, factor, args.ratio, args.plan_tokens, extra)
    print(f"\nrefit temporaries taken as {extra:.2f} × one layer's x xᵀ (the largest synthetic refit's peak); "
          f"GPU: {H100_BF16 / 1e12:.0f} TFLOP/s bf16 and {H100_FP64 / 1e12:.0f} TFLOP/s FP64 peaks at "
          f"{UTILISATION:.0%}; total {time.perf_counter() - start:.0f} s; peak resident "
          f"{human_bytes(max(PEAK[0], rss_mib('VmHWM')) * 2**20)}")


if __name__ == "__main__":
    main()
