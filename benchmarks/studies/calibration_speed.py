"""Calibration speed, side by side in one run on the same token batches.

(a) a plain ``model(input_ids)`` forward with logits, (b) the decoder body without recorders,
(c) glu-prune's calibration, (d) optipfair 0.4.2's calibration path when it is installed
(``pip install --no-deps optipfair==0.4.2``). Prints tokens/s, ratios to (a) and (b), and the peak
resident memory above the loaded model, at two token budgets (it must not grow with tokens).

    python -m benchmarks.studies.calibration_speed [--model smollm2-135m] [--tokens 8192,32768]
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks.measures import reset_peak, rss_mib
from calibrate.batches import make_batches
from calibrate.corpora import load_corpus
from calibrate.glu import decoder
from calibrate.models import load_model
from calibrate.progress import showing
from calibrate.run import calibrate


def plain_forward(model, batches):
    for b in batches:
        model(**b, use_cache=False)


def decoder_only(model, batches):
    body = decoder(model)
    for b in batches:
        body(**b, use_cache=False)


def ours(model, batches):
    with showing(False):
        calibrate(model, batches)


def optipfair_path(model, batches):
    from optipfair.pruning import mlp_glu

    handles = mlp_glu.setup_mlp_hooks_for_importance(model, torch.device("cpu"))
    try:
        mlp_glu.run_calibration_forward_passes(model, batches, torch.device("cpu"), show_progress=False)
    finally:
        for h in handles:
            h.remove()


def optipfair_available() -> bool:
    try:
        import optipfair.pruning.mlp_glu  # noqa: F401
    except ImportError:
        return False
    return True


def measure(fn, model, batches, tokens: int) -> tuple[float, float]:
    """Tokens/s of one run and its peak RSS above the level before it (MiB)."""
    reset_peak()
    before = rss_mib("VmRSS")
    with torch.inference_mode():
        start = time.perf_counter()
        fn(model, batches)
        speed = tokens / (time.perf_counter() - start)
    return speed, rss_mib("VmHWM") - before


def interleaved(variants: dict, model, batches, tokens: int, repeats: int) -> dict[str, tuple[float, float]]:
    """Best tokens/s and largest peak per variant, the variants taking turns in every round so that
    load from elsewhere on the machine hits them alike."""
    best: dict[str, tuple[float, float]] = {}
    for _ in range(repeats):
        for name, fn in variants.items():
            speed, peak = measure(fn, model, batches, tokens)
            old_speed, old_peak = best.get(name, (0.0, 0.0))
            best[name] = (max(speed, old_speed), max(peak, old_peak))
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--corpus", default="wikitext2")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--tokens", default="8192,32768", help="token budgets, comma-separated")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, tokenizer = load_model(args.model, device="cpu")
    corpus = load_corpus(args.corpus, part="calibration", data_dir=args.data_dir)
    variants = {"(a) model forward + logits": plain_forward, "(b) decoder body, no hooks": decoder_only,
                "(c) glu-prune calibrate": ours}
    if optipfair_available():
        variants["(d) optipfair 0.4.2 calibration"] = optipfair_path
    print(f"{args.model}, {args.corpus}, seq_len {args.seq_len}, batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, best of {args.repeats}")
    for tokens in [int(t) for t in args.tokens.split(",")]:
        batches = make_batches(tokenizer, corpus, seq_len=args.seq_len, max_tokens=tokens, batch_size=args.batch_size)
        count = sum(int(b["attention_mask"].sum()) for b in batches)
        with torch.inference_mode():
            decoder_only(model, batches[:1])  # warm-up
        results = interleaved(variants, model, batches, count, args.repeats)
        a, b = results["(a) model forward + logits"][0], results["(b) decoder body, no hooks"][0]
        print(f"\n{count} tokens")
        print(f"{'variant':34} {'tok/s':>8} {'vs (a)':>7} {'vs (b)':>7} {'peak MiB':>9}")
        for name, (speed, peak) in results.items():
            print(f"{name:34} {speed:8.0f} {speed / a:6.2f}x {speed / b:6.2f}x {peak:9.0f}")


if __name__ == "__main__":
    main()
