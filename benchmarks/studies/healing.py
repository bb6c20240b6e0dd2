"""Perplexity on the calibration domain against healing steps, with the CPU time spent.

    python -m benchmarks.studies.healing --ratios 0.2 --corpora wikitext2,sms_spam --steps 150 --out out/healing

For each (ratio, corpus): prune the model with ``hybrid`` (reference settings), heal it on the
corpus's calibration part, and measure the evaluation part of the calibration corpus every
``--eval-every`` steps (time spent measuring is not counted as healing time); every corpus is
measured before and after. Writes healing.json (one entry per run, written as each finishes, so
an interrupted benchmark resumes) and healing.png.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.grid.spec import parse_corpora, parse_list
from calibrate.corpora import load_corpus
from calibrate.files import write_text
from calibrate.models import load_model
from calibrate.perplexity import protocol_perplexity
from calibrate.progress import showing
from pruning.config import PruneConfig
from pruning.heal import HealConfig, heal, training_batches
from pruning.workflow import CalibrationSettings, prune_with_corpus


def heal_run(base, tokenizer, corpus: str, parts: dict, ratio: float, config: HealConfig, eval_every: int,
             data_dir=None, seq_len: int = 256) -> dict:
    """Prune ``base`` (hybrid, ``ratio``) on ``corpus``, heal it and record the curve."""
    calibration = load_corpus(corpus, part="calibration", data_dir=data_dir)
    with showing(False):
        student = prune_with_corpus(base, tokenizer, PruneConfig(ratio=ratio, method="hybrid"), corpus=calibration,
                                    settings=CalibrationSettings(seq_len=128, max_tokens=8192)).model

    def measure(model, names) -> dict[str, float]:
        model.eval()
        result = {n: protocol_perplexity(model, tokenizer, parts[n]).perplexity for n in names}
        model.train()
        return result

    before = measure(student, parts)
    curve = [{"step": 0, "seconds": 0.0, "perplexity": before[corpus]}]

    def on_step(step: int, record: dict) -> None:
        if step % eval_every == 0:
            curve.append({"step": step, "seconds": record["seconds"], "loss": record["loss"],
                          "perplexity": measure(student, [corpus])[corpus]})
            point = curve[-1]
            print(f"{corpus} {ratio:g}: step {step}, {point['seconds']:.0f} s, perplexity {point['perplexity']:.2f}",
                  flush=True)

    batches = training_batches(tokenizer, calibration, seq_len=seq_len, batch_size=4)
    with showing(False):
        healed, history = heal(student, base, batches, config, on_step=on_step)
    after = measure(healed, parts)
    if curve[-1]["step"] != len(history):
        curve.append({"step": len(history), "seconds": history[-1]["seconds"], "perplexity": after[corpus]})
    return {"corpus": corpus, "ratio": ratio, "config": config.__dict__, "before": before, "after": after,
            "curve": curve, "tokens": sum(h["tokens"] for h in history), "seconds": history[-1]["seconds"]}


def plot(runs: list[dict], base: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = list(dict.fromkeys(r["corpus"] for r in runs))
    fig, axes = plt.subplots(1, len(corpora), figsize=(6 * len(corpora), 4.2), squeeze=False)
    for ax, corpus in zip(axes[0], corpora):
        for run in (r for r in runs if r["corpus"] == corpus):
            ax.plot([p["seconds"] / 60 for p in run["curve"]], [p["perplexity"] for p in run["curve"]],
                    marker="o", label=f"hybrid {run['ratio']:.0%}")
        ax.axhline(base[corpus], color="black", linestyle="--", label="base (unpruned)")
        ax.set(title=f"calibrated, healed and evaluated on {corpus}", xlabel="healing CPU time (minutes)",
               ylabel="perplexity", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpora", default="wikitext2,sms_spam")
    p.add_argument("--ratios", default="0.2,0.4")
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--max-seconds", type=float, default=600.0, help="healing time limit per run")
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="out/healing")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / "healing.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {"runs": []}
    base, tokenizer = load_model(args.model)
    names = [c.name for c in parse_corpora(args.corpora)]
    parts = {n: load_corpus(n, part="evaluation", data_dir=args.data_dir) for n in names}
    if "base" not in results:
        results["base"] = {n: protocol_perplexity(base, tokenizer, parts[n]).perplexity for n in names}
    config = HealConfig(steps=args.steps, lr=args.lr, alpha=args.alpha, max_seconds=args.max_seconds)
    for ratio in parse_list(args.ratios, float, "--ratios"):
        for corpus in names:
            if any(r["corpus"] == corpus and r["ratio"] == ratio for r in results["runs"]):
                print(f"{corpus} {ratio:g}: already in {results_path}, skipped")
                continue
            run = heal_run(base, tokenizer, corpus, parts, ratio, config, args.eval_every, args.data_dir)
            gap = run["before"][corpus] - results["base"][corpus]
            run["gap_closed"] = (run["before"][corpus] - run["after"][corpus]) / gap if gap > 0 else None
            results["runs"].append(run)
            write_text(results_path, json.dumps(results, indent=1))
            print(f"{corpus} {ratio:g}: {run['before'][corpus]:.2f} -> {run['after'][corpus]:.2f} "
                  f"(base {results['base'][corpus]:.2f}, gap closed {run['gap_closed']:.0%}) in "
                  f"{run['seconds']:.0f} s of healing; after, on every corpus: "
                  + ", ".join(f"{n} {v:.2f}" for n, v in run["after"].items()))
    plot(results["runs"], results["base"], out / "healing.png")


if __name__ == "__main__":
    main()
