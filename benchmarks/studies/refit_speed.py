"""Least-squares refit speed: the ridge search as it was, as it is, and by one eigendecomposition.

Three searches over ``RIDGE_GRID`` refit the same layers from the same statistics, taking turns
layer by layer (the order rotates), so that load from elsewhere on the machine hits them alike:
``old`` (per ridge: a Cholesky refit, its target term and its held-out error from scratch), ``new``
(:func:`pruning.registry.reconstruct_layer`: the ridge-independent products once, per ridge a
factorisation, a solve and one product) and ``eigen`` (one eigendecomposition of ``S[K, K]`` gives
every ridge's held-out error in closed form, the chosen ridge's weights by Cholesky). Prints, per
kept fraction, each one's time and its speed ratio to ``old``, the largest absolute and relative
weight difference to ``old`` (relative: to the layer's largest weight), the held-out errors'
relative difference, and whether every layer chose the same ridge; with ``--obs``, the OBS removal
order's time before and after its in-place update, and whether the orders agree; with
``--floor``, only the cost of each operation a refit is made of, and what that leaves an exact
search of the ridge grid for a 5x speed-up. The statistics
(second moments and a held-out eighth, as ``glu-prune prune`` calibrates them) are computed once
and kept in ``--stats``.

    python -m benchmarks.studies.refit_speed [--model smollm2-135m] [--corpus wikitext2] [--tokens 65536]
        [--ratios 0.2,0.4] [--layers 0,5,10] [--threads 1] [--obs]
        [--stats out/refit_speed/wikitext2-65536.stats.safetensors]
    python -m benchmarks.studies.refit_speed --floor [--ratios 0.2,0.4] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.reference import lstsq_refit, refit_error, ridge_solve
from calibrate.corpora import load_corpus
from calibrate.glu import glu_layers, parse_layers
from calibrate.models import load_model
from calibrate.stats import ActivationStats, LayerStats, PairedStats
from pruning.config import PruneConfig
from pruning.decide import allocate, score_layer
from pruning.reconstruct import RIDGE_GRID, held_out, moments, obs_removal_order, ridge_scale, target_term
from pruning.registry import reconstruct_layer
from pruning.workflow import CalibrationSettings, calibrate_corpus, calibration_batches, provenance


def ridge_candidates(method: str, weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats, holdout: LayerStats,
                     pairs: list[PairedStats] | None = None) -> list[tuple]:
    """The search as it was: per ridge of ``RIDGE_GRID`` a Cholesky refit (its target term formed
    again) and its held-out error from scratch, as (error, alpha, weight, bias); the least error won."""
    w = weight.double()
    centred = method == "lstsq-centred"
    second, mean = moments(fit, centred)
    cross = pairs[0].means()[0] if pairs else None
    candidates = []
    for alpha in RIDGE_GRID:
        new = lstsq_refit(w, second, keep, alpha, cross)
        bias = w @ mean - new @ mean[keep] if centred else None
        candidates.append((refit_error(w, new, bias, keep, holdout, pairs[1] if pairs else None), alpha, new, bias))
    return candidates


def per_ridge(method: str, weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats, holdout: LayerStats):
    """(weight, alpha, error) of the per-ridge search."""
    error, alpha, new, _ = min(ridge_candidates(method, weight, keep, fit, holdout), key=lambda c: c[0])
    return new, alpha, error


def obs_order_by_copies(weight: torch.Tensor, second: torch.Tensor, damping: float = 1e-2,
                        block: int = 32) -> torch.Tensor:
    """:func:`pruning.reconstruct.obs_removal_order` as it was: the remaining block of ``W`` and
    ``H⁻¹`` copied out at every step instead of updated in place."""
    size = second.shape[0]
    h = second.double() + damping * second.diagonal().mean().clamp_min(1e-12) * torch.eye(size, dtype=torch.float64)
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    w = weight.double().clone()
    index = torch.arange(size)
    order = torch.empty(size, dtype=torch.float64)
    step = 0
    while index.numel():
        errors = w.square().sum(0) / hinv.diagonal()
        chosen = errors.argsort()[: min(block, index.numel())]
        order[index[chosen]] = torch.arange(step, step + chosen.numel(), dtype=torch.float64)
        step += chosen.numel()
        rest = torch.ones(index.numel(), dtype=torch.bool)
        rest[chosen] = False
        if not rest.any():
            break
        solve = torch.linalg.solve(hinv[chosen][:, chosen], hinv[chosen][:, rest])
        w = w[:, rest] - w[:, chosen] @ solve
        hinv = hinv[rest][:, rest] - hinv[rest][:, chosen] @ solve
        index = index[rest]
    return order


@dataclass(frozen=True)
class RidgePath:
    """The refit at every ridge of a grid from one eigendecomposition ``S[K, K] = Q diag(e) Qᵀ``:
    ``W'(λ) = P diag(1/(e + λ)) Qᵀ`` with ``P = T Q`` and ``T`` the target term
    (:func:`pruning.reconstruct.target_term`)."""

    alphas: tuple[float, ...]
    ridges: torch.Tensor  # λ of each α
    values: torch.Tensor  # e
    basis: torch.Tensor  # Q
    projected: torch.Tensor  # P
    target: torch.Tensor  # T
    s_kk: torch.Tensor

    @property
    def shrink(self) -> torch.Tensor:
        """``1/(e + λ)`` (|K| × ridges); a column is inf or negative where ``S[K, K] + λI`` is singular."""
        return 1 / (self.values[:, None] + self.ridges[None, :])

    @property
    def regular(self) -> torch.Tensor:
        """Which ridges leave ``S[K, K] + λI`` positive definite."""
        return self.values.min() + self.ridges > 0

    def weight(self, index: int) -> torch.Tensor:
        """``W'`` (hidden × |K|) at ridge ``alphas[index]``, from the eigenbasis."""
        return (self.projected * self.shrink[:, index]) @ self.basis.T

    def refit(self, index: int) -> torch.Tensor:
        """``W'`` at ridge ``alphas[index]`` by Cholesky: ``lstsq_refit``'s result, bit for bit."""
        return ridge_solve(self.target, self.s_kk, self.ridges[index], self.alphas[index])

    def times(self, vector: torch.Tensor) -> torch.Tensor:
        """``W'(λ) v`` at every ridge (hidden × ridges), for ``v`` of length |K|."""
        return self.projected @ (self.shrink * (self.basis.T @ vector)[:, None])


def ridge_path(weight: torch.Tensor, second: torch.Tensor, keep: torch.Tensor, alphas: tuple[float, ...],
               cross: torch.Tensor | None = None) -> RidgePath:
    """``lstsq_refit`` at every ``alpha`` from one eigendecomposition of ``S[K, K]``, float64."""
    s_kk = second[keep][:, keep]
    values, basis = torch.linalg.eigh(s_kk)
    target = target_term(weight, second, keep, cross)
    ridges = torch.tensor(alphas, dtype=torch.float64) * ridge_scale(s_kk)
    return RidgePath(tuple(alphas), ridges, values, basis, target @ basis, target, s_kk)


def path_errors(path: RidgePath, weight: torch.Tensor, keep: torch.Tensor, holdout: LayerStats,
                pairs: PairedStats | None = None, fit_mean: torch.Tensor | None = None) -> torch.Tensor:
    """``refit_error`` of every ridge of ``path`` (inf where singular), without forming a refit: with
    ``H`` the held-out second moment, ``A`` its cross term (``W H[:, K]``, or ``W E[d x_Kᵀ]`` with
    ``pairs``) and ``D = diag(1/(e + λ))``, the error is
    ``tr(W H Wᵀ) − 2 tr(P D Qᵀ Aᵀ) + tr(P D (Qᵀ H[K, K] Q) D Pᵀ)``. ``fit_mean`` (centred refits)
    adds the bias ``W mean − W' mean_K``."""
    h = held_out(weight, keep, holdout, pairs)
    q, p, shrink = path.basis, path.projected, path.shrink
    linear = (p * (h.across @ q)).sum(0)
    quadratic = (q.T @ (h.s_kk @ q)) * (p.T @ p)
    errors = h.total - 2 * linear @ shrink + ((quadratic @ shrink) * shrink).sum(0)
    if fit_mean is not None:
        bias = (weight.double() @ fit_mean)[:, None] - path.times(fit_mean[keep])
        held = h.output_mean[:, None] - path.times(h.mean_k)
        errors = errors - 2 * (bias * held).sum(0) + bias.square().sum(0)
    return torch.where(path.regular & errors.isfinite(), errors, torch.inf)


def eigen_search(method: str, weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats, holdout: LayerStats):
    """(weight, alpha, error) of the search by one eigendecomposition: every ridge's held-out error
    from :func:`path_errors`, the least one's weights by Cholesky."""
    w = weight.double()
    centred = method == "lstsq-centred"
    second, mean = moments(fit, centred)
    path = ridge_path(w, second, keep, RIDGE_GRID)
    errors = path_errors(path, w, keep, holdout, None, mean if centred else None)
    best = int(errors.argmin())
    return path.refit(best), RIDGE_GRID[best], float(errors[best])


def statistics_for(model, tokenizer, args) -> ActivationStats:
    """The cached statistics in ``args.stats``, or a calibration written there."""
    path = Path(args.stats)
    if path.is_file():
        return ActivationStats.load(path, model=model)
    corpus = load_corpus(args.corpus, part="calibration", data_dir=args.data_dir)
    settings = CalibrationSettings(seq_len=args.seq_len, max_tokens=args.tokens)
    batches = calibration_batches(tokenizer, corpus, settings)
    stats = calibrate_corpus(model, batches, provenance(args.model, corpus, settings), second_moment=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    stats.save(path)
    return stats


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def library_search(method: str, weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats, holdout: LayerStats):
    """(weight, alpha, error) of :func:`pruning.registry.reconstruct_layer`."""
    new, _, info = reconstruct_layer(method, weight, keep, fit, holdout)
    return new, info["ridge"], info["holdout_error"]


SEARCHES = {"old": per_ridge, "new": library_search, "eigen": eigen_search}


def compare(model, stats: ActivationStats, ratio: float, method: str, reconstruct: str,
            layers: list[int] | None) -> list[dict]:
    """Every search on every selected layer at ``ratio``, taking turns (the order rotates)."""
    config = PruneConfig(ratio=ratio, method=method, reconstruct=reconstruct, layers=layers)
    selected = glu_layers(model, config.layer_list)
    scores = {g.index: score_layer(g, config, stats.layers[g.index]) for g in selected}
    plan = allocate(scores, model.config.hidden_size, config, None)
    names, rows = list(SEARCHES), []
    for turn, layer in enumerate(selected):
        weight, keep = layer.down_weight().detach().cpu(), plan[layer.index]
        fit, held = stats.layers[layer.index], stats.holdout[layer.index]
        order = names[turn % len(names):] + names[: turn % len(names)]
        out = {name: timed(SEARCHES[name], reconstruct, weight, keep, fit, held) for name in order}
        (old_w, old_alpha, old_error), _ = out["old"]
        row = {"layer": layer.index, "kept": len(keep)}
        for name, ((new_w, alpha, error), seconds) in out.items():
            diff = float((new_w - old_w).abs().max())
            row[name] = {"s": seconds, "abs": diff, "rel": diff / float(old_w.abs().max()), "ridge": alpha,
                         "same": alpha == old_alpha, "error_rel": abs(error - old_error) / abs(old_error)}
        rows.append(row)
    return rows


def report(ratio: float, rows: list[dict]) -> None:
    kept = sorted({r["kept"] for r in rows})
    old = sum(r["old"]["s"] for r in rows)
    print(f"\nratio {ratio}: {len(rows)} layers, kept {','.join(map(str, kept))} of each; old {old:.2f} s")
    for name in SEARCHES:
        mine = [r[name] for r in rows]
        seconds = sum(m["s"] for m in mine)
        same = sum(m["same"] for m in mine)
        median = statistics.median(r["old"]["s"] / r[name]["s"] for r in rows)
        print(f"  {name:5} {seconds:8.2f} s  old/{name} {old / seconds:5.2f}x (median per layer {median:.2f}x)  "
              f"weights vs old: max abs {max(m['abs'] for m in mine):.2e}, rel {max(m['rel'] for m in mine):.2e}; "
              f"held-out error rel {max(m['error_rel'] for m in mine):.1e}; same ridge {same}/{len(rows)}")
    chosen: dict[float, int] = {}
    for r in rows:
        chosen[r["old"]["ridge"]] = chosen.get(r["old"]["ridge"], 0) + 1
    print("  ridges chosen (old): " + ", ".join(f"{alpha:g} x{count}" for alpha, count in sorted(chosen.items())))
    for r in rows:
        for name in SEARCHES:
            if not r[name]["same"]:
                print(f"    layer {r['layer']}: old {r['old']['ridge']:g}, {name} {r[name]['ridge']:g}")


def compare_obs(model, stats: ActivationStats, layers: list[int] | None) -> list[dict]:
    """The OBS removal order of every selected layer, old and new, taking turns."""
    rows = []
    for turn, layer in enumerate(glu_layers(model, layers)):
        fit = stats.layers[layer.index]
        weight, second = layer.down_weight().detach().cpu(), fit.second_moment / max(fit.count, 1)
        runs = {"old": obs_order_by_copies, "new": obs_removal_order}
        out = {name: timed(runs[name], weight, second)
               for name in (("old", "new") if turn % 2 == 0 else ("new", "old"))}
        rows.append({"layer": layer.index, "old_s": out["old"][1], "new_s": out["new"][1],
                     "same": torch.equal(out["old"][0], out["new"][0])})
    old, new = sum(r["old_s"] for r in rows), sum(r["new_s"] for r in rows)
    same = sum(r["same"] for r in rows)
    print(f"\nobs removal order: {len(rows)} layers, old (copies) {old:.2f} s, new (in place) {new:.2f} s, "
          f"ratio old/new {old / new:.2f}x; the same order on {same}/{len(rows)} layers")
    return rows


def operation_costs(hidden: int, size: int, kept: int, repeats: int = 3) -> dict[str, float]:
    """Seconds of each float64 operation a layer's refit is made of, at SmolLM2's shapes, on random
    statistics: the ridge-independent products, one factorisation, one solve, one eigendecomposition."""
    x = torch.randn(4 * size, size, dtype=torch.float64)
    second, weight = x.T @ x / len(x), torch.randn(hidden, size, dtype=torch.float64)
    keep = torch.randperm(size)[:kept].sort().values
    s_kk = second[keep][:, keep]
    factor = torch.linalg.cholesky(s_kk)
    target = weight @ second[:, keep]
    ops = {"target term W S[:, K] (= held-out cross term W H[:, K])": lambda: weight @ second[:, keep],
           "held-out total W H": lambda: weight @ second,
           "Cholesky factorisation": lambda: torch.linalg.cholesky(s_kk),
           "Cholesky solve (hidden right-hand sides)": lambda: torch.cholesky_solve(target.T, factor),
           "product W' H[K, K]": lambda: target @ s_kk,
           "eigendecomposition of S[K, K]": lambda: torch.linalg.eigh(s_kk)}
    costs = {}
    for name, op in ops.items():
        op()
        start = time.perf_counter()
        for _ in range(repeats):
            op()
        costs[name] = (time.perf_counter() - start) / repeats
    return costs


def report_floor(hidden: int, size: int, kept: int) -> None:
    """What an exact search of the ridge grid cannot go below, from :func:`operation_costs`."""
    c = operation_costs(hidden, size, kept)
    for name, seconds in c.items():
        print(f"    {name:58} {seconds * 1e3:7.1f} ms")
    ridges = len(RIDGE_GRID)
    product = c["target term W S[:, K] (= held-out cross term W H[:, K])"]
    old = ridges * (product + c["Cholesky factorisation"] + c["Cholesky solve (hidden right-hand sides)"]
                    + c["held-out total W H"])
    floor = 2 * product + c["Cholesky factorisation"] + c["Cholesky solve (hidden right-hand sides)"]
    print(f"  kept {kept}: old search about {old * 1e3:.0f} ms; the output alone (target, cross term, one "
          f"factorisation and solve) {floor * 1e3:.0f} ms, so 5x leaves {(old / 5 - floor) * 1e3:.0f} ms for the "
          f"{ridges} ridges' errors: {ridges} factorisations take {ridges * c['Cholesky factorisation'] * 1e3:.0f} ms, "
          f"one eigendecomposition {c['eigendecomposition of S[K, K]'] * 1e3:.0f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="wikitext2")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens (an eighth held out)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--stats", default=None,
                        help="statistics cache (default out/refit_speed/<corpus>-<tokens>.stats.safetensors)")
    parser.add_argument("--ratios", default="0.2,0.4", help="fractions of neurons removed, comma-separated")
    parser.add_argument("--method", default="hybrid", help="the selection whose kept neurons are refitted")
    parser.add_argument("--reconstruct", default="lstsq", choices=["lstsq", "lstsq-centred"])
    parser.add_argument("--layers", default=None, help="e.g. 0,5,10 or 0-9 (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--obs", action="store_true", help="also time the OBS removal order, old and new")
    parser.add_argument("--floor", action="store_true",
                        help="only time the operations a refit is made of and print what bounds an exact search")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.floor:
        print(f"{torch.get_num_threads()} threads, hidden 576, intermediate 1536 (SmolLM2-135M), random statistics")
        for ratio in [float(r) for r in args.ratios.split(",")]:
            report_floor(576, 1536, round(1536 * (1 - ratio)))
        return
    args.stats = args.stats or f"out/refit_speed/{args.corpus}-{args.tokens}.stats.safetensors"
    model, tokenizer = load_model(args.model, device="cpu")
    stats = statistics_for(model, tokenizer, args)
    layers = parse_layers(args.layers) if args.layers else None
    print(f"{args.model}, {args.corpus}, {stats.tokens} calibration tokens ({args.stats}), {args.method} "
          f"+{args.reconstruct}, {torch.get_num_threads()} threads")
    for ratio in [float(r) for r in args.ratios.split(",")]:
        report(ratio, compare(model, stats, ratio, args.method, args.reconstruct, layers))
    if args.obs:
        compare_obs(model, stats, layers)


if __name__ == "__main__":
    main()
