"""Least-squares refit speed: the per-ridge Cholesky search against one eigendecomposition per layer.

Both refit the same layers from the same statistics, taking turns layer by layer (which one goes
first alternates), so that load from elsewhere on the machine hits them alike. Prints, per kept
fraction, the time of each, the ratio old/new, the largest absolute and relative difference of the
refitted weights (relative: to the layer's largest old weight) and of the held-out errors, and
whether every layer chose the same ridge; with ``--obs``, the OBS removal order's time before and
after its in-place update, and whether the orders agree. The statistics (second moments and a held-out eighth, as
``glu-prune prune`` calibrates them) are computed once and kept in ``--stats``.

    python -m benchmarks.refit_speed [--model smollm2-135m] [--corpus wikitext2] [--tokens 65536]
        [--ratios 0.2,0.4] [--layers 0,5,10] [--stats out/refit_speed/wikitext2-65536.stats.safetensors]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from calibrate.corpora import load_corpus
from calibrate.glu import glu_layers, parse_layers
from calibrate.models import load_model
from calibrate.stats import ActivationStats, LayerStats, PairedStats
from pruning.config import PruneConfig
from pruning.decide import allocate, score_layer
from pruning.reconstruct import RIDGE_GRID, lstsq_refit, moments, obs_removal_order, reconstruct_layer, refit_error
from pruning.workflow import CalibrationSettings, calibrate_corpus, calibration_batches, provenance


def ridge_candidates(method: str, weight: torch.Tensor, keep: torch.Tensor, fit: LayerStats, holdout: LayerStats,
                     pairs: list[PairedStats] | None = None) -> list[tuple]:
    """The refit as it was before the eigendecomposition: a Cholesky refit and its held-out error
    per ridge of ``RIDGE_GRID``, as (error, alpha, weight, bias); the search took the least error."""
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


def compare(model, stats: ActivationStats, ratio: float, method: str, reconstruct: str,
            layers: list[int] | None) -> dict:
    """Old and new refit of every selected layer at ``ratio``, taking turns."""
    config = PruneConfig(ratio=ratio, method=method, reconstruct=reconstruct, layers=layers)
    selected = glu_layers(model, config.layer_list)
    scores = {g.index: score_layer(g, config, stats.layers[g.index]) for g in selected}
    plan = allocate(scores, model.config.hidden_size, config, None)
    rows = []
    for turn, layer in enumerate(selected):
        weight, keep = layer.down_weight().detach().cpu(), plan[layer.index]
        fit, held = stats.layers[layer.index], stats.holdout[layer.index]
        runs = {"old": per_ridge, "new": reconstruct_layer}
        out = {name: timed(runs[name], reconstruct, weight, keep, fit, held)
               for name in (("old", "new") if turn % 2 == 0 else ("new", "old"))}
        (old_w, old_alpha, old_error), old_s = out["old"]
        (new_w, _, info), new_s = out["new"]
        diff = float((new_w - old_w).abs().max())
        rows.append({"layer": layer.index, "kept": len(keep), "old_s": old_s, "new_s": new_s, "abs": diff,
                     "rel": diff / float(old_w.abs().max()), "same_ridge": info["ridge"] == old_alpha,
                     "ridge": info["ridge"], "old_ridge": old_alpha,
                     "error_rel": abs(info["holdout_error"] - old_error) / abs(old_error)})
    return {"rows": rows}


def report(ratio: float, rows: list[dict]) -> None:
    old, new = sum(r["old_s"] for r in rows), sum(r["new_s"] for r in rows)
    kept = sorted({r["kept"] for r in rows})
    same = sum(r["same_ridge"] for r in rows)
    chosen = {}
    for r in rows:
        chosen[r["ridge"]] = chosen.get(r["ridge"], 0) + 1
    print(f"\nratio {ratio}: {len(rows)} layers, kept {','.join(map(str, kept))} of each")
    print(f"  old (7 Cholesky refits + errors) {old:8.2f} s   new (1 eigendecomposition) {new:8.2f} s")
    print(f"  speed ratio old/new {old / new:.2f}x (median per layer "
          f"{statistics.median(r['old_s'] / r['new_s'] for r in rows):.2f}x)")
    print(f"  largest weight difference: absolute {max(r['abs'] for r in rows):.3e}, relative "
          f"{max(r['rel'] for r in rows):.3e}; held-out error, relative {max(r['error_rel'] for r in rows):.3e}")
    print(f"  same ridge on every layer: {'yes' if same == len(rows) else 'no'} ({same}/{len(rows)}); chosen: "
          + ", ".join(f"{alpha:g} x{count}" for alpha, count in sorted(chosen.items())))
    for r in rows:
        if not r["same_ridge"]:
            print(f"    layer {r['layer']}: old {r['old_ridge']:g}, new {r['ridge']:g}")


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
    args = parser.parse_args()
    args.stats = args.stats or f"out/refit_speed/{args.corpus}-{args.tokens}.stats.safetensors"
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, device="cpu")
    stats = statistics_for(model, tokenizer, args)
    layers = parse_layers(args.layers) if args.layers else None
    print(f"{args.model}, {args.corpus}, {stats.tokens} calibration tokens ({args.stats}), {args.method} "
          f"+{args.reconstruct}, {torch.get_num_threads()} threads")
    for ratio in [float(r) for r in args.ratios.split(",")]:
        report(ratio, compare(model, stats, ratio, args.method, args.reconstruct, layers)["rows"])
    if args.obs:
        compare_obs(model, stats, layers)


if __name__ == "__main__":
    main()
