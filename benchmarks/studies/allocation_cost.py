"""What an allocation costs against the uniform one, measured side by side in one run.

Each allocation prunes the same model (score, allocate, plan, refit and cut every layer:
:func:`pruning.prune.prune`, what ``glu-prune prune`` runs after calibration, without the save)
from the same statistics and held-out calibration text (the last eighth of the calibration
batches, as ``glu-prune prune`` holds it out), in turn; prints each one's seconds, its ratio to
``uniform``, the range of kept widths, and how closely its per-layer importance follows the full
``sensitivity`` one (Pearson correlation, when both were run). ``--out`` writes the figures and
each allocation's importance and kept widths as JSON.

    python -m benchmarks.studies.allocation_cost --stats S.safetensors [--model smollm2-135m]
        [--corpus wikitext2] [--tokens 65536] [--ratio 0.4] [--reconstruct lstsq]
        [--allocations uniform,sensitivity-sampled,sensitivity] [--threads 1] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from calibrate.corpora import load_corpus
from calibrate.models import load_model
from calibrate.run import split_holdout
from calibrate.stats import ActivationStats
from pruning.config import PruneConfig
from pruning.prune import prune
from pruning.workflow import HOLDOUT, CalibrationSettings, calibration_batches


def correlation(a: dict, b: dict) -> float:
    """Pearson correlation of two per-layer importance dicts over their common layers."""
    layers = sorted(set(a) & set(b))
    x = torch.tensor([float(a[i]) for i in layers], dtype=torch.float64)
    y = torch.tensor([float(b[i]) for i in layers], dtype=torch.float64)
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


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
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model, tokenizer = load_model(args.model, device="cpu")
    stats = ActivationStats.load(args.stats, model)
    corpus = load_corpus(args.corpus, data_dir=args.data_dir)
    text = split_holdout(calibration_batches(tokenizer, corpus, CalibrationSettings(max_tokens=args.tokens)),
                         HOLDOUT)[1]
    held_tokens = sum(int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()
                      for b in text)
    print(f"{args.model}, {args.corpus}, ratio {args.ratio}, reconstruct {args.reconstruct}, "
          f"{held_tokens} held-out tokens, {torch.get_num_threads()} threads")
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
    main()
