"""The least-squares refit of one layer at real shapes, as it was against as it is (issue 28).

Timing does not depend on the values, so each shape gets random statistics: a fit second moment of
``--tokens`` random activations (well conditioned: more tokens than kept neurons), a held-out one of
``--holdout`` tokens and those held-out activations themselves. Per shape, taking turns (the order
rotates each repeat), it times:

- ``old``: the search as it was (every ridge of the grid 1e-6..1: a Cholesky factorisation, a solve
  and the held-out error through ``H[K, K]``; always a refit);
- ``new``: :func:`pruning.registry.reconstruct_layer` as it is (no refit a candidate, the grid to
  1e3, scored downhill from 1e-2), with the held-out second moment;
- ``rows``: the same with the held-out activations instead of their second moment;
- ``grid``: the same scoring every ridge (the exhaustive float64 search), whose choice ``new`` and
  ``rows`` must equal;

and prints each one's seconds, its ratio to ``old``, the candidates scored, the choice and whether
it equals ``grid``'s (ridge and weights, bit for bit), or ``old``'s when ``grid`` is not run.

    python -m benchmarks.studies.refit_scale [--shapes 1.5b,smollm2] [--repeats 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import torch

from calibrate.stats import LayerStats
from pruning.reconstruct import RidgeCandidates
from pruning.registry import reconstruct_layer

SHAPES = {"smollm2": (576, 1536, 0.2), "1.5b": (1536, 8960, 0.2), "8b": (4096, 14336, 0.2)}  # hidden, inter, ratio
OLD_GRID = 7  # RIDGE_GRID[:7] = 1e-6 .. 1, the grid as it was


def random_stats(rows: torch.Tensor) -> LayerStats:
    """Statistics of ``rows`` (tokens × width): the sums, and the x xᵀ sums formed in float32."""
    x = rows.double()
    return LayerStats(len(x), x.sum(0), x.abs().sum(0), x.square().sum(0), x.abs().amax(0),
                      (rows.T @ rows).double())


def problem(hidden: int, size: int, ratio: float, tokens: int, holdout: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mix = 1 + torch.rand(size, generator=g)  # columns of different scales
    fit = random_stats(torch.randn(tokens, size, generator=g) * mix)
    held_rows = torch.randn(holdout, size, generator=g) * mix
    weight = torch.randn(hidden, size, generator=g, dtype=torch.float64) / size ** 0.5
    keep = torch.randperm(size, generator=g)[: size - int(ratio * size)].sort().values
    return weight, keep, fit, random_stats(held_rows), held_rows.double()


def old_search(weight, keep, fit, held, _rows):
    search = RidgeCandidates(weight, keep, fit, held, centred=False)
    for i in range(OLD_GRID):
        search.error(i)
    error, alpha, new, _ = search.chosen()
    return new, {"choice": "lstsq", "ridge": alpha, "scored": OLD_GRID}


SEARCHES = {
    "old": old_search,
    "new": lambda w, k, f, h, r: reconstruct_layer("lstsq", w, k, f, h)[::2],
    "rows": lambda w, k, f, h, r: reconstruct_layer("lstsq", w, k, f, r)[::2],
    "grid": lambda w, k, f, h, r: reconstruct_layer("lstsq", w, k, f, h, search="grid")[::2],
}


def run_shape(name: str, args) -> None:
    hidden, size, ratio = SHAPES[name]
    start = time.perf_counter()
    weight, keep, fit, held, rows = problem(hidden, size, ratio, args.tokens, args.holdout)
    print(f"\n{name}: hidden {hidden}, intermediate {size}, kept {len(keep)}, fit {args.tokens} tokens, held-out "
          f"{args.holdout} (statistics built in {time.perf_counter() - start:.1f} s)", flush=True)
    names = [n for n in SEARCHES if n in args.searches]
    seconds = {n: [] for n in names}
    results = {}
    for repeat in range(args.repeats):
        order = names[repeat % len(names):] + names[: repeat % len(names)]
        for n in order:
            t = time.perf_counter()
            results[n] = SEARCHES[n](weight, keep, fit, held, rows)
            seconds[n].append(time.perf_counter() - t)
            print(f"  {n}: {seconds[n][-1]:.2f} s", flush=True)
    judge = "grid" if "grid" in results else "old"  # without the exhaustive search: the old one's ridge
    reference = results.get(judge)
    print(f"{'search':>6} {'seconds':>9} {'vs old':>7} {'scored':>6} {'choice':>12} {'same as ' + judge:>12}")
    for n in names:
        s = min(seconds[n])
        info = results[n][1]
        same = "-" if reference is None else str(info["ridge"] == reference[1]["ridge"]
                                                  and torch.equal(results[n][0], reference[0]))
        ratio_text = f"{min(seconds['old']) / s:.2f}x" if "old" in seconds else "-"
        choice = "none" if info["choice"] == "none" else f"{info['ridge']:g}"
        print(f"{n:>6} {s:9.2f} {ratio_text:>7} {info['scored']:>6} {choice:>12} {same:>12}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", default="smollm2,1.5b", help=f"from {', '.join(SHAPES)}")
    p.add_argument("--tokens", type=int, default=8192, help="fitting tokens of the random statistics")
    p.add_argument("--holdout", type=int, default=1024, help="held-out tokens")
    p.add_argument("--searches", default=",".join(SEARCHES))
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"threads {torch.get_num_threads()}")
    for name in args.shapes.split(","):
        run_shape(name, args)


if __name__ == "__main__":
    main()
