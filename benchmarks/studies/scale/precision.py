"""What float32 products change in a real prune: SmolLM2 calibrated on WikiText-2 with the second
moments accumulated the OLD way (float64 ``addmm``, held-out slice as a matrix) and the NEW way
(float32 products added in float64, held-out slice as activations when smaller than the width),
then pruned alike (``hybrid``, ``lstsq``). Prints the per-layer relative difference of the second
moments (fit and held-out), whether the kept sets and the chosen ridges are identical, and both
pruned models' WikiText-2 perplexity (PROTOCOL.md: seq_len 512, first 8192 test tokens).

    python -m benchmarks.studies.scale.precision --data-dir ../shared/data [--tokens 16384] [--ratio 0.2]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.studies.scale.reference import float64_accumulation
from calibrate.corpora import load_corpus
from calibrate.models import load_model
from calibrate.perplexity import protocol_perplexity
from calibrate.progress import showing
from pruning.config import PruneConfig
from pruning.prune import prune
from pruning.workflow import CalibrationSettings, calibrate_corpus, calibration_batches


def relative(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).norm() / old.norm())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--method", default="hybrid")
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model, device="cpu", dtype="float32")
    batches = calibration_batches(tokenizer, load_corpus("wikitext2", part="calibration", data_dir=args.data_dir),
                                  CalibrationSettings(max_tokens=args.tokens))
    evaluation = load_corpus("wikitext2", part="evaluation", data_dir=args.data_dir)
    runs = {}
    for name in ("old", "new"):
        start = time.perf_counter()
        if name == "old":
            with float64_accumulation(), showing(False):
                stats = calibrate_corpus(model, batches, {}, second_moment=True)
        else:
            with showing(False):
                stats = calibrate_corpus(model, batches, {}, second_moment=True)
        seconds = time.perf_counter() - start
        result = prune(model, stats, PruneConfig(ratio=args.ratio, method=args.method, reconstruct="lstsq"))
        ppl = protocol_perplexity(result.model, tokenizer, evaluation)
        runs[name] = (stats, result, ppl, seconds)
        print(f"{name}: calibration {seconds:.1f} s (in memory, fit and held-out), WikiText-2 perplexity "
              f"{ppl.perplexity:.2f} over {ppl.tokens} tokens", flush=True)
    (old, old_result, old_ppl, _), (new, new_result, new_ppl, _) = runs["old"], runs["new"]
    fit = [relative(new.layers[i].moment(), old.layers[i].moment()) for i in sorted(old.layers)]
    held = [relative(new.holdout[i].moment(), old.holdout[i].moment()) for i in sorted(old.holdout)]
    form = "activations" if next(iter(new.holdout.values())).activations is not None else "a matrix"
    print(f"\n{args.model}, {new.tokens} fit + {next(iter(new.holdout.values())).count} held-out tokens "
          f"(NEW keeps the held-out slice as {form}), {args.method} {args.ratio:.0%} + lstsq")
    print(f"||S_new - S_old||_F / ||S_old||_F, fit: max {max(fit):.2e} (layer {fit.index(max(fit))}), "
          f"median {sorted(fit)[len(fit) // 2]:.2e}; held-out: max {max(held):.2e}")
    same_kept = all(torch.equal(old_result.plan[i], new_result.plan[i]) for i in old_result.plan)
    differing = [i for i in old_result.plan if not torch.equal(old_result.plan[i], new_result.plan[i])]
    print(f"kept sets identical: {same_kept}" + (f" (differ in layers {differing})" if differing else ""))
    ridges = {i: (old_result.manifest.choices[i].get("ridge"),
                  new_result.manifest.choices[i].get("ridge"))
              for i in old_result.manifest.choices}
    changed = {i: r for i, r in ridges.items() if r[0] != r[1]}
    print(f"chosen ridges identical: {not changed}" + (f" (old, new: {changed})" if changed else ""))
    print(f"WikiText-2 perplexity: OLD {old_ppl.perplexity:.4f}, NEW {new_ppl.perplexity:.4f} "
          f"({new_ppl.perplexity / old_ppl.perplexity - 1:+.3%})")


if __name__ == "__main__":
    main()
