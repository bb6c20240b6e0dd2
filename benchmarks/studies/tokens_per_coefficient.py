"""How many calibration tokens a least-squares refit needs at a given kept width, and how large the
held-out slice that chooses its ridge must be (issue 28).

SmolLM2 (or ``--model``), ``--ratio`` of every layer's neurons removed (``hybrid`` selection). Each
calibration corpus is cut once into disjoint slices: a held-out slice (``--holdout-sizes``, nested
prefixes), a test slice (``--test-tokens``, only for the held-out study) and fitting chunks whose
prefixes give every budget of ``--tpc`` tokens per coefficient (fitting tokens / kept neurons). The
statistics are additive, so each chunk is calibrated once and the budgets are running merges; the
held-out and test slices stay the same across budgets.

Two tables:

- **held-out size**: per layer (``--study-layers``), every candidate (no refit, each ridge of
  ``RIDGE_GRID``) is fitted, scored on each held-out prefix and on the test slice; the regret of
  the held-out choice is its test error over the best candidate's, minus 1 (mean over layers), and
  ``best`` how many layers chose the test-best candidate.
- **tokens per coefficient**: perplexity (PROTOCOL.md: seq_len 512, 8192 tokens / 400 messages) on
  both corpora of the model pruned with ``none``, with the refit as it was (``old``: the 7 ridges
  1e-6..1, always a refit) and with ``lstsq`` as it is (no refit a candidate, the grid to 1e3), the
  held-out slice ``--holdout`` tokens, or with ``--holdout-per-fit 7`` a seventh of each budget's
  fitting tokens (what ``prune`` holds out: an eighth of the calibration tokens); and how many
  layers chose no refit. One pruned copy of the model and two running sums are held at a time
  (about 3 GB for SmolLM2).

    python -m benchmarks.studies.tokens_per_coefficient --data-dir ../shared/data [--tpc 1,2,5,10,50]
        [--corpora wikitext2,sms_spam] [--holdout 2048] [--out out/tpc]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import torch

from benchmarks.reference import refit_error
from calibrate.batches import collate, message_rows, packed_rows, pad_id
from calibrate.corpora import load_corpus
from calibrate.glu import glu_layers
from calibrate.models import load_model
from calibrate.perplexity import protocol_perplexity
from calibrate.progress import showing
from calibrate.run import calibrate
from calibrate.stats import ActivationStats
from pruning.config import PruneConfig
from pruning.decide import decide
from pruning.plan import kept_count
from pruning.prune import cut
from pruning.reconstruct import RIDGE_GRID, RidgeCandidates, held_out

OLD_GRID = 7  # the grid as it was: RIDGE_GRID[:7] = 1e-6 .. 1


def token_rows(tokenizer, corpus, seq_len: int, total: int) -> list[list[int]]:
    build = packed_rows if corpus.kind == "documents" else message_rows
    return build(tokenizer, corpus, seq_len, total)


def chunks(rows: list[list[int]], edges: list[int]) -> list[list[list[int]]]:
    """Consecutive groups of ``rows``, each ending once the running token count reaches the next edge."""
    groups, group, seen, edge = [], [], 0, iter(edges)
    target = next(edge)
    for row in rows:
        group.append(row)
        seen += len(row)
        if seen >= target:
            groups.append(group)
            group = []
            target = next(edge, None)
            if target is None:
                break
    if len(groups) < len(edges):
        raise SystemExit(f"the corpus has {seen} tokens, fewer than {edges[-1]}: lower --tpc or --test-tokens")
    return groups


def calibrated(model, rows: list[list[int]], pad: int) -> ActivationStats:
    batches = [collate(rows[i:i + 8], pad) for i in range(0, len(rows), 8)]
    with showing(False):
        return calibrate(model, batches, second_moment=True)


@torch.inference_mode()
def add_into(running: ActivationStats | None, part: ActivationStats) -> ActivationStats:
    """``running`` with ``part``'s sums added in place (one set of second moments held, not three as
    ``merge`` would: the old, the part and the merged); ``part`` itself when there is no ``running``."""
    if running is None:
        return part
    for i, s in running.layers.items():
        t = part.layers[i]
        s.count += t.count
        for name in ("sum", "abs_sum", "sq_sum"):
            getattr(s, name).add_(getattr(t, name))
        torch.maximum(s.max_abs, t.max_abs, out=s.max_abs)
        s.second_moment.add_(t.second_moment)
    running.meta["tokens"] = str(running.tokens)
    return running


def fraction_slices(model, tokenizer, name: str, args, kept: int):
    """Per budget (fit tokens, fit stats, held-out stats), the held-out slice a ``args.holdout_per_fit``-th
    of the fitting tokens (as the product's held-out eighth of the calibration tokens gives: 1/7 of
    the fitting ones): nested prefixes of a held-out pool at the corpus's start, then the fitting
    chunks. Two running sums are held, whatever the budgets."""
    corpus = load_corpus(name, part="calibration", data_dir=args.data_dir)
    fits = [math.ceil(t * kept) for t in args.tpc]
    helds = [math.ceil(f / args.holdout_per_fit) for f in fits]
    edges = helds + [helds[-1] + f for f in fits]
    rows = token_rows(tokenizer, corpus, args.seq_len, edges[-1] + 4 * args.seq_len)
    groups = chunks(rows, edges)
    pad = pad_id(tokenizer)
    held, fit = None, None
    for held_group, fit_group in zip(groups[:len(fits)], groups[len(fits):]):
        held = add_into(held, calibrated(model, held_group, pad))
        fit = add_into(fit, calibrated(model, fit_group, pad))
        yield fit.tokens, fit, held


def slices(model, tokenizer, name: str, args, kept: int):
    """(held-out prefixes {tokens: stats}, test stats, an iterator of (fit tokens, fit stats) per budget)."""
    corpus = load_corpus(name, part="calibration", data_dir=args.data_dir)
    sizes = sorted(args.holdout_sizes)
    fits = [math.ceil(t * kept) for t in args.tpc]
    held_edges = sizes
    test_edge = sizes[-1] + args.test_tokens
    edges = held_edges + [test_edge] + [test_edge + f for f in fits]
    rows = token_rows(tokenizer, corpus, args.seq_len, edges[-1] + 4 * args.seq_len)
    groups = chunks(rows, edges)
    pad = pad_id(tokenizer)
    held, running = {}, None
    for size, group in zip(sizes, groups):
        part = calibrated(model, group, pad)
        running = part if running is None else running.merge(part)
        held[size] = running
    test = calibrated(model, groups[len(sizes)], pad)
    return held, test, budgets_of(model, groups[len(sizes) + 1:], pad)


def budgets_of(model, groups, pad):
    """(fit tokens, fit stats) of each budget, calibrated as they are asked for."""
    running = None
    for group in groups:
        running = add_into(running, calibrated(model, group, pad))
        yield running.tokens, running


def candidates_of(weight, keep, fit):
    """[(name, weight)]: no refit, then every ridge of RIDGE_GRID (singular ones left out)."""
    found = RidgeCandidates(weight, keep, fit, None, centred=False)
    out = [("none", weight.double()[:, keep])]
    for i, alpha in enumerate(RIDGE_GRID):
        factor = found.factor(i)
        if factor is not None:
            out.append((f"{alpha:g}", torch.cholesky_solve(found.target.T, factor).T))
    return out


def holdout_study(model, config: PruneConfig, held: dict, test: ActivationStats, budgets, layers) -> list[dict]:
    rows = []
    for tokens, fit in budgets:
        plan = decide(model, fit, PruneConfig(ratio=config.ratio, method=config.method)).plan
        per_size = {size: [] for size in held}
        for layer in glu_layers(model, layers):
            weight, keep = layer.down_weight().detach().double(), plan[layer.index]
            cands = candidates_of(weight, keep, fit.layers[layer.index])
            tests = [refit_error(weight, w, None, keep, test.layers[layer.index]) for _, w in cands]
            oracle = min(range(len(cands)), key=lambda i: tests[i])
            for size, stats in held.items():
                h = held_out(weight, keep, stats.layers[layer.index])
                errors = [h.error(w) for _, w in cands]
                chosen = min(range(len(cands)), key=lambda i: (errors[i], i != 0))
                per_size[size].append((tests[chosen] / tests[oracle] - 1, chosen == oracle, cands[chosen][0]))
        for size, results in per_size.items():
            rows.append({"fit_tokens": tokens, "tpc": tokens / len(next(iter(plan.values()))), "holdout": size,
                         "regret": sum(r[0] for r in results) / len(results),
                         "worst": max(r[0] for r in results),
                         "best": sum(r[1] for r in results), "layers": len(results),
                         "choices": [r[2] for r in results]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def old_refit(model, stats: ActivationStats, config: PruneConfig):
    """(``model`` pruned by ``config`` with every layer refitted as it was: the ridge of
    RIDGE_GRID[:7] with the least held-out error, always a refit; each layer's ridge)."""
    decision = decide(model, stats, replace_reconstruct(config, "none"))
    ridges = []
    for layer in glu_layers(model, sorted(decision.plan)):
        keep = decision.plan[layer.index]
        search = RidgeCandidates(layer.down_weight().detach().double(), keep, stats.layers[layer.index],
                                 stats.holdout[layer.index], centred=False)
        for i in range(OLD_GRID):
            search.error(i)
        _, alpha, new, _ = search.chosen()
        decision.refits[layer.index] = (new, None)
        ridges.append(alpha)
    return pruned_by(model, decision), ridges


def pruned_by(model, decision):
    pruned = copy.deepcopy(model)
    cut(pruned, decision)
    return pruned


def replace_reconstruct(config: PruneConfig, reconstruct: str) -> PruneConfig:
    return PruneConfig(ratio=config.ratio, method=config.method, reconstruct=reconstruct)


def new_refit(model, stats: ActivationStats, config: PruneConfig):
    decision = decide(model, stats, replace_reconstruct(config, "lstsq"))
    pruned = pruned_by(model, decision)
    nones = sum(c["choice"] == "none" for c in decision.choices.values())
    return pruned, nones, [c["ridge"] for c in decision.choices.values()]


EVAL = {"eval_tokens": 8192, "eval_docs": 400}  # PROTOCOL.md; --eval-tokens/--eval-docs only for a smoke run


def evaluate(model, tokenizer, parts) -> dict[str, float]:
    return {name: round(protocol_perplexity(model, tokenizer, part, **EVAL).perplexity, 2)
            for name, part in parts.items()}


def table(model, tokenizer, config, name, held: ActivationStats, budgets, parts, old_until: int) -> list[dict]:
    """A perplexity row per budget of ``budgets`` ((fit tokens, fit stats) or (fit tokens, fit stats,
    held-out stats), else ``held`` for every budget); the refit as it was is evaluated up to
    ``old_until`` fitting tokens. One pruned copy of the model at a time."""
    rows = []
    for tokens, fit, *own in budgets:
        slice_ = own[0] if own else held
        stats = ActivationStats(fit.layers, fit.meta, slice_.layers)
        start = time.perf_counter()
        none = pruned_by(model, decide(model, stats, replace_reconstruct(config, "none")))
        row = {"calibrated": name, "fit_tokens": tokens, "holdout": slice_.tokens, "none": evaluate(none, tokenizer,
                                                                                                   parts)}
        del none
        new, nones, ridges = new_refit(model, stats, config)
        row.update(none_layers=nones, ridges=ridges)
        # no refit in every layer: the no-refit model itself
        row["lstsq"] = row["none"] if nones == len(ridges) else evaluate(new, tokenizer, parts)
        del new
        if tokens <= old_until:
            old, old_ridges = old_refit(model, stats, config)
            row["old_ridges"] = old_ridges
            same = ridges == old_ridges  # the same ridge in every layer: the same weights, bit for bit
            row["old"] = row["lstsq"] if same else evaluate(old, tokenizer, parts)
            del old
        row["seconds"] = round(time.perf_counter() - start, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def markdown(rows: list[dict], kept: int) -> str:
    lines = ["| calibrated on | fit tokens | held-out tokens | tokens / coefficient | none: WikiText-2 / SMS "
             "| old lstsq: WikiText-2 / SMS | lstsq: WikiText-2 / SMS | layers choosing none |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        cells = [" / ".join(f"{r[k][c]:.2f}" for c in ("wikitext2", "sms_spam")) if k in r else "-"
                 for k in ("none", "old", "lstsq")]
        lines.append(f"| {r['calibrated']} | {r['fit_tokens']} | {r['holdout']} | {r['fit_tokens'] / kept:.1f} | "
                     + " | ".join(cells) + f" | {r['none_layers']} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--corpora", default="wikitext2,sms_spam")
    p.add_argument("--ratio", type=float, default=0.2)
    p.add_argument("--tpc", default="1,2,5,10,50", help="tokens per coefficient of the budgets")
    p.add_argument("--holdout-sizes", default="512,1024,2048,4096")
    p.add_argument("--holdout", type=int, default=2048, help="the held-out size of the perplexity table")
    p.add_argument("--holdout-per-fit", type=float, default=None,
                   help="table only: the held-out slice 1/N of each budget's fitting tokens (7: the product's "
                        "held-out eighth of the calibration tokens) instead of a fixed --holdout")
    p.add_argument("--test-tokens", type=int, default=8192)
    p.add_argument("--study-layers", default="0,3,6,9,12,15,18,21,24,27")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--skip", default="", help="holdout and/or table: phases to skip")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--old-until", type=int, default=2000, help="evaluate the old refit up to these fit tokens")
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-docs", type=int, default=400)
    p.add_argument("--out", default="out/tpc")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    EVAL.update(eval_tokens=args.eval_tokens, eval_docs=args.eval_docs)
    args.tpc = [float(t) for t in args.tpc.split(",")]
    args.holdout_sizes = sorted({int(s) for s in args.holdout_sizes.split(",")} | {args.holdout})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model, tokenizer = load_model(args.model, dtype="float32")
    config = PruneConfig(ratio=args.ratio, reconstruct="lstsq")
    kept = kept_count(glu_layers(model)[0].intermediate_size, model.config.hidden_size, config.target)
    parts = {n: load_corpus(n, part="evaluation", data_dir=args.data_dir) for n in ("wikitext2", "sms_spam")}
    layers = [int(i) for i in args.study_layers.split(",")]
    rows = []
    for name in args.corpora.split(","):
        mine = []
        if args.holdout_per_fit:  # the table alone, its held-out slice growing with the budget
            for budget in fraction_slices(model, tokenizer, name, args, kept):
                mine += table(model, tokenizer, config, name, None, [budget], parts, args.old_until)
                (out / f"table-{name}.json").write_text(json.dumps(mine, indent=1))
            rows += mine
            continue
        if "holdout" in args.skip:  # the table alone: only its held-out slice, no test slice
            args.holdout_sizes, args.test_tokens = [args.holdout], 1
        held, test, budgets = slices(model, tokenizer, name, args, kept)
        print(f"{name}: kept {kept}, held-out {list(held)}", flush=True)
        study = []
        for budget in budgets:  # one budget at a time: each result is written as soon as it is measured
            if "holdout" not in args.skip:
                study += holdout_study(model, config, held, test, [budget], layers)
                (out / f"holdout-{name}.json").write_text(json.dumps(study, indent=1))
            if "table" not in args.skip:
                mine += table(model, tokenizer, config, name, held[args.holdout], [budget], parts,
                              args.old_until)
                (out / f"table-{name}.json").write_text(json.dumps(mine, indent=1))
        rows += mine
    if rows:
        text = markdown(rows, kept)
        (out / "table.md").write_text(text + "\n")
        print(text)


if __name__ == "__main__":
    main()
