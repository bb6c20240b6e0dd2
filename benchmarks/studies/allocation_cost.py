"""What an allocation costs against the uniform one, measured side by side in one run.

Each allocation prunes the same model (score, allocate, plan, refit and cut every layer:
:func:`pruning.prune.prune`, what ``glu-prune prune`` runs after calibration, without the save)
from the same statistics and held-out calibration text (the last eighth of the calibration
batches, as ``glu-prune prune`` holds it out), in turn; prints each one's seconds, its ratio to
``uniform``, the range of kept widths, and how closely its per-layer importance follows the full
``sensitivity`` one (Pearson correlation, when both were run). ``--out`` writes the figures and
each allocation's importance and kept widths as JSON. With ``--trials``, instead: the sampled
layers' sensitivity trials timed as full forward passes and as the library runs them (resumed from
the dense output of the layer before), in turns, with whether both give the same increases.

    python -m benchmarks.studies.allocation_cost --stats S.safetensors [--model smollm2-135m]
        [--corpus wikitext2] [--tokens 65536] [--ratio 0.4] [--reconstruct lstsq]
        [--allocations uniform,sensitivity-sampled,sensitivity] [--threads 1] [--out F.json]
    python -m benchmarks.studies.allocation_cost --stats S.safetensors --trials [--turns 2] ...
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from calibrate.batches import real_tokens
from calibrate.corpora import load_corpus
from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers
from calibrate.models import load_model
from calibrate.run import split_holdout
from calibrate.stats import ActivationStats
from pruning.allocation import sample_layers
from pruning.allocators import SAMPLED_LAYERS
from pruning.config import PruneConfig
from pruning.decide import layer_stats, refit_layer, score_layer
from pruning.importance import layer_sensitivity, mean_nll, substituted, trial_down
from pruning.plan import kept_count, top_k
from pruning.prune import prune
from pruning.workflow import HOLDOUT, CalibrationSettings, calibration_batches


def correlation(a: dict, b: dict) -> float:
    """Pearson correlation of two per-layer importance dicts over their common layers."""
    layers = sorted(set(a) & set(b))
    x = torch.tensor([float(a[i]) for i in layers], dtype=torch.float64)
    y = torch.tensor([float(b[i]) for i in layers], dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def full_pass_sensitivity(model, plan: dict, refit, batches: list[dict]) -> dict[int, float]:
    """The sensitivity trials as they were: a full forward pass over ``batches`` per trial layer."""
    base = mean_nll(model, batches)
    increase = {}
    for layer in glu_layers(model, sorted(plan)):
        with substituted(layer.down, *trial_down(layer, plan[layer.index], refit)):
            increase[layer.index] = mean_nll(model, batches) - base
    return increase


def time_trials(model, stats, text: list[dict], ratio: float, reconstruct: str, turns: int) -> None:
    """Full passes against resumed trials on the sampled layers, in turns; prints seconds and ratio."""
    config = PruneConfig(ratio=ratio, method="hybrid", reconstruct=reconstruct)
    layers = sample_layers([g.index for g in glu_layers(model)], SAMPLED_LAYERS)
    plan = {}
    for g in glu_layers(model, layers):
        scores = score_layer(g, config, layer_stats(stats, g.index)[0])
        plan[g.index] = top_k(scores, kept_count(scores.numel(), model.config.hidden_size, config.target))

    def refit(layer, kept):
        return refit_layer(layer, kept, reconstruct, *layer_stats(stats, layer.index))[:2]

    seconds = {"full passes": [], "resumed": []}
    results = {}
    for turn in range(turns):
        for name, run in (("full passes", full_pass_sensitivity), ("resumed", layer_sensitivity))[::1 - 2 * (turn % 2)]:
            start = time.perf_counter()
            results[name] = run(model, plan, refit, text)
            seconds[name].append(time.perf_counter() - start)
    best = {name: min(v) for name, v in seconds.items()}
    print(f"trials on layers {layers}: full passes {best['full passes']:.1f} s, resumed {best['resumed']:.1f} s "
          f"({best['full passes'] / best['resumed']:.2f}x faster), best of {turns}; "
          f"same increases: {results['full passes'] == results['resumed']}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stats", required=True, help="statistics with second moments (glu-prune calibrate)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="wikitext2")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tokens", type=int, default=65536, help="calibration tokens (the statistics' budget)")
    parser.add_argument("--ratio", type=float, default=0.4)
    parser.add_argument("--reconstruct", default="lstsq")
    parser.add_argument("--allocations", default="uniform,sensitivity-sampled,sensitivity")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--trials", action="store_true", help="time the sensitivity trials, full against resumed")
    parser.add_argument("--turns", type=int, default=2)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, device="cpu")
    stats = ActivationStats.load(args.stats, model)
    corpus = load_corpus(args.corpus, data_dir=args.data_dir)
    text = split_holdout(calibration_batches(tokenizer, corpus, CalibrationSettings(max_tokens=args.tokens)),
                         HOLDOUT)[1]
    print(f"{args.model}, {args.corpus}, ratio {args.ratio}, reconstruct {args.reconstruct}, "
          f"{real_tokens(text)} held-out tokens, {torch.get_num_threads()} threads")
    if args.trials:
        time_trials(model, stats, text, args.ratio, args.reconstruct, args.turns)
        return
    rows = {}
    for allocation in args.allocations.split(","):
        config = PruneConfig(ratio=args.ratio, method="hybrid", allocation=allocation, reconstruct=args.reconstruct)
        start = time.perf_counter()
        manifest = prune(model, stats, config, text_batches=text).manifest.to_dict()
        seconds = time.perf_counter() - start
        widths = dict(enumerate(manifest["intermediate_sizes"]))
        importance = {int(i): v for i, v in (manifest.get("layer_importance") or {}).items()} or None
        rows[allocation] = {"seconds": seconds, "widths": widths, "importance": importance}
    base = rows.get("uniform", {}).get("seconds")
    full = rows.get("sensitivity", {}).get("importance")
    print(f"{'allocation':<22} {'seconds':>9} {'÷ uniform':>10} {'kept widths':>14} {'r (sensitivity)':>16}")
    for allocation, row in rows.items():
        ratio = f"{row['seconds'] / base:.2f}x" if base else "-"
        widths = f"{min(row['widths'].values())}-{max(row['widths'].values())}"
        r = f"{correlation(row['importance'], full):.3f}" if full and row["importance"] else "-"
        row["ratio_to_uniform"], row["r_sensitivity"] = ratio, r
        print(f"{allocation:<22} {row['seconds']:9.1f} {ratio:>10} {widths:>14} {r:>16}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1, default=float))


if __name__ == "__main__":
    try:
        main()
    except GluPruneError as error:
        raise SystemExit(f"allocation_cost: error: {error}") from None
