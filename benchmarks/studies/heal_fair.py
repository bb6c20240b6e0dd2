"""Healing measured fairly: pruned models and the unpruned model fine-tuned alike, fully or by LoRA.

    python -m benchmarks.studies.heal_fair --corpus wikitext2 --ratio 0.4 --minutes 10,30 --threads 1 \\
        --stats out/select40/stats/<file>.safetensors --out out/heal-fair
    python -m benchmarks.studies.heal_fair --corpus wikitext2 --ratio 0 ...      # the fair baseline
    python -m benchmarks.studies.heal_fair --report --out out/heal-fair          # the table

One run per process, so that its peak memory is its own. ``--ratio`` is the fraction of neurons
removed by ``hybrid`` + ``lstsq`` from the statistics file (``0``: the unpruned model, fine-tuned
with the same loss, data and time: the baseline that shows what pruning costs once both are
tuned); ``--lora R`` trains rank-R adapters instead of every weight. Training is
:func:`pruning.heal.heal` (distillation from the unpruned model mixed with the LM loss) on the
corpus's calibration part, on ``--threads`` threads; at every mark of ``--minutes`` (training time
only) every corpus's evaluation part is measured. The learning rate decays over the steps a short
pilot run predicts for the last mark. ``--steps`` gives the marks as step counts instead (no pilot
run, the same marks on every machine: the tests use it). Writes OUT/<corpus>-r<ratio>[-lora<R>].json.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from benchmarks.grid.spec import parse_list
from benchmarks.measures import parameter_count, reset_peak, rss_mib
from calibrate.corpora import load_corpus
from calibrate.files import write_text
from calibrate.models import load_model
from calibrate.perplexity import protocol_perplexity
from calibrate.progress import showing
from calibrate.stats import ActivationStats
from pruning.config import PruneConfig
from pruning.heal import HealConfig, heal, training_batches
from pruning.prune import prune

CORPORA = ("wikitext2", "sms_spam")
PILOT_STEPS = 3


def run_name(corpus: str, ratio: float, lora: int | None) -> str:
    return f"{corpus}-r{ratio:g}" + (f"-lora{lora}" if lora else "")


def starting_model(base, stats_path: str | None, ratio: float):
    """A copy of ``base`` (``ratio`` 0) or ``base`` pruned by hybrid + lstsq from the statistics."""
    if ratio == 0:
        return copy.deepcopy(base)
    if stats_path is None:
        raise SystemExit("--stats is needed for a pruned run (a statistics file with second moments)")
    stats = ActivationStats.load(stats_path, model=base)
    return prune(base, stats, PruneConfig(ratio=ratio, method="hybrid", reconstruct="lstsq")).model


def pilot_step_seconds(student, base, batches: list[dict], config: HealConfig) -> float:
    """Seconds per training step, from a few steps on a copy (the first is not counted)."""
    pilot = replace(config, steps=PILOT_STEPS, max_seconds=None)
    with showing(False):
        _, history = heal(copy.deepcopy(student), base, batches, pilot)
    return (history[-1]["seconds"] - history[0]["seconds"]) / (len(history) - 1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", choices=CORPORA, default="wikitext2", help="calibrated, healed and measured on")
    p.add_argument("--ratio", type=float, default=0.4, help="fraction of neurons removed; 0: the unpruned model")
    p.add_argument("--stats", default=None, help="statistics with second moments of --corpus (pruned runs)")
    p.add_argument("--lora", type=int, default=None, help="LoRA rank (default: full fine-tuning)")
    p.add_argument("--minutes", default="10,30", help="training-time marks at which every corpus is measured")
    p.add_argument("--steps", default=None, help="marks as step counts instead of --minutes (e.g. 100,300)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default 2e-4, LoRA 1e-3)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default="out/heal-fair")
    p.add_argument("--report", action="store_true", help="print the table of every run in --out")
    args = p.parse_args(argv)
    out = Path(args.out)
    if args.report:
        report(out)
        return
    torch.set_num_threads(args.threads)
    path = out / f"{run_name(args.corpus, args.ratio, args.lora)}.json"
    if path.exists():
        raise SystemExit(f"{path} exists: delete it to run again")
    by_steps = args.steps is not None
    marks = sorted(parse_list(args.steps, int, "--steps") if by_steps else parse_list(args.minutes, float, "--minutes"))
    base, tokenizer = load_model(args.model)
    parts = {n: load_corpus(n, part="evaluation", data_dir=args.data_dir) for n in CORPORA}
    student = starting_model(base, args.stats, args.ratio)
    batches = training_batches(tokenizer, load_corpus(args.corpus, part="calibration", data_dir=args.data_dir),
                               seq_len=256, batch_size=4)
    lr = args.lr or (1e-3 if args.lora else 2e-4)
    if by_steps:
        config, step_seconds = HealConfig(steps=marks[-1], lr=lr, lora_rank=args.lora), None
    else:
        config = HealConfig(steps=10**6, lr=lr, lora_rank=args.lora, max_seconds=marks[-1] * 60)
        step_seconds = pilot_step_seconds(student, base, batches, config)
        config = replace(config, steps=max(config.warmup_steps + 1, int(marks[-1] * 60 / step_seconds)))

    def measure() -> dict[str, float]:
        student.eval()
        result = {n: protocol_perplexity(student, tokenizer, part).perplexity for n, part in parts.items()}
        student.train()
        return result

    points = [{"minutes": 0.0, "steps": 0, "tokens": 0, "perplexity": measure()}]
    gc.collect()
    reset_peak()  # the peak from here on is training's (and the marks' measurements)
    rss_before = rss_mib("VmRSS")
    tokens, pending = 0, list(marks) if by_steps else [m * 60 for m in marks]

    def on_step(step: int, record: dict) -> None:
        nonlocal tokens
        tokens += record["tokens"]
        if pending and ((step if by_steps else record["seconds"]) >= pending[0] or step == config.steps):
            pending.pop(0)
            points.append({"minutes": record["seconds"] / 60, "steps": step, "tokens": tokens, "loss": record["loss"],
                           "perplexity": measure()})
            print(f"{path.stem}: {points[-1]['minutes']:.1f} min, {step} steps, {tokens} tokens: "
                  + ", ".join(f"{n} {v:.2f}" for n, v in points[-1]["perplexity"].items()), flush=True)

    started = time.perf_counter()
    with showing(False):
        _, history = heal(student, base, batches, config, on_step=on_step)
    if pending:  # the schedule ended before the last mark
        points.append({"minutes": history[-1]["seconds"] / 60, "steps": len(history), "tokens": tokens,
                       "perplexity": measure()})
    result = {"corpus": args.corpus, "ratio": args.ratio, "lora": args.lora, "lr": lr, "threads": args.threads,
              "planned_steps": config.steps, "pilot_step_seconds": step_seconds,
              "parameters": parameter_count(student),
              "base": {n: protocol_perplexity(base, tokenizer, part).perplexity for n, part in parts.items()},
              "points": points, "train_tokens_per_second": tokens / history[-1]["seconds"],
              "rss_before_training_mib": rss_before, "rss_peak_mib": rss_mib("VmHWM"),
              "wall_seconds": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(result, indent=1))
    print(f"wrote {path}")


def report(out: Path) -> None:
    """Markdown: every run's marks with the domain's perplexity against the base and against the
    unpruned model tuned for the same time, the other corpus, tokens, speed and memory."""
    runs = [json.loads(f.read_text()) for f in sorted(out.glob("*.json"))]
    tuned = {(r["corpus"], r["lora"]): r for r in runs if r["ratio"] == 0}
    print("| healed on | model | minutes | steps | tokens | domain ppl | × base | × tuned base | other corpus "
          "| gap closed (per M tokens) | train tok/s | peak RSS MiB (+ training) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for r in sorted(runs, key=lambda r: (r["corpus"], -r["ratio"], r["lora"] or 0)):
        domain, other = r["corpus"], next(c for c in CORPORA if c != r["corpus"])
        start, base = r["points"][0]["perplexity"][domain], r["base"][domain]
        name = ("unpruned" if r["ratio"] == 0 else f"{r['ratio']:.0%} hybrid+lstsq") + \
            (f", LoRA r{r['lora']}" if r["lora"] else ", full")
        baseline = tuned.get((domain, r["lora"])) or tuned.get((domain, None))
        for mark, point in enumerate(r["points"]):
            ppl = point["perplexity"][domain]
            versus = mark_value(baseline, mark, domain) if baseline and r["ratio"] else None
            closed = (start - ppl) / (start - base) if point["tokens"] and start > base else None
            gap = None if closed is None else f"{closed:.0%} ({closed / (point['tokens'] / 1e6):.1f})"
            print(f"| {domain} | {name} | {point['minutes']:.1f} | {point['steps']} | {point['tokens']} | {ppl:.2f} "
                  f"| {ppl / base:.3f} | {'' if versus is None else f'{ppl / versus:.3f}'} "
                  f"| {point['perplexity'][other]:.2f} (was {r['points'][0]['perplexity'][other]:.2f}) "
                  f"| {gap or ''} | {r['train_tokens_per_second']:.0f} "
                  f"| {r['rss_peak_mib']:.0f} (+{r['rss_peak_mib'] - r['rss_before_training_mib']:.0f}) |")


def mark_value(run: dict, mark: int, corpus: str) -> float | None:
    """The perplexity of ``run`` at its ``mark``-th measurement (0: before training; the last one is
    where its time or its schedule ended), or None."""
    return run["points"][mark]["perplexity"][corpus] if mark < len(run["points"]) else None


if __name__ == "__main__":
    main()
