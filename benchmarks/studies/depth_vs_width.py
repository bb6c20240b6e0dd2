"""Layers or neurons at one parameter count: for each fraction of the total parameters, remove it by
depth (whole layers, least important by cosine), by width (uniform GLU neurons, a data score with a
refit) or by both (half each, pruning/equal_size.py), calibrated on each corpus, evaluated on every
corpus by the protocol. Resumable: DIR/results.json keeps every finished cell.

    python -m benchmarks.studies.depth_vs_width --param-ratios 0.1,0.2 --corpora wikitext2,sms_spam --out DIR

Writes DIR/results.md (a table, and the glu-prune command of every row) and DIR/depth_vs_width.png.
``--speed`` adds transformers speed (prefill and decode, batch 1), all variants measured in turns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics as st
import time
from pathlib import Path

import torch

from benchmarks.deploy.engines import TorchEngine, measure_turn, prompt_ids
from benchmarks.grid.spec import parse_corpora, parse_list
from benchmarks.grid.store import ResultStore, record_settings
from benchmarks.measures import parameter_count
from calibrate.corpora import load_corpus
from calibrate.files import write_text
from calibrate.models import load_model, load_pruned
from calibrate.perplexity import protocol_perplexity
from calibrate.progress import showing
from calibrate.stats import ActivationStats
from pruning.config import PruneConfig
from pruning.depth import DepthConfig, prune_depth
from pruning.equal_size import PLANS, EqualSizePlan, plan, size_profile
from pruning.prune import prune
from pruning.save import save_pruned
from pruning.workflow import (
    CalibrationSettings,
    calibrate_corpus,
    calibration_batches,
    provenance,
    prune_depth_with_corpus,
)


class Study:
    """One results folder: the base model, its calibration statistics per corpus, and the cells."""

    def __init__(self, args):
        self.args, self.out = args, Path(args.out)
        self.corpora = parse_corpora(args.corpora)
        self.calibration = parse_corpora(args.calibrate_on) if args.calibrate_on else self.corpora
        self.settings = CalibrationSettings(max_tokens=args.calib_tokens)
        self.out.mkdir(parents=True, exist_ok=True)
        record_settings(self.out, {"model": args.model, "calib_tokens": args.calib_tokens, "score": args.layer_score,
                                   "method": args.method, "reconstruct": args.reconstruct,
                                   "eval_tokens": args.eval_tokens, "eval_docs": args.eval_docs,
                                   "seq_len": args.seq_len,
                                   "corpora": {c.name: c.source for c in self.corpora + self.calibration}})
        self.store = ResultStore(self.out)
        self.base, self.tok = load_model(args.model, dtype="float32")
        self.profile = size_profile(self.base)
        self.eval_parts = {c.name: load_corpus(c.source, part="evaluation", data_dir=args.data_dir, name=c.name)
                           for c in self.corpora}
        self.parts: dict = {}

    def calibration_part(self, name: str):
        if name not in self.parts:
            spec = next(c for c in self.calibration if c.name == name)
            self.parts[name] = load_corpus(spec.source, part="calibration", data_dir=self.args.data_dir, name=name)
        return self.parts[name]

    def stats(self, name: str) -> ActivationStats:
        """The base model's statistics on ``name``: neuron sums with second moments and layer cosines, one pass."""
        path = self.out / "stats" / f"{name}-{self.args.calib_tokens}.safetensors"
        if path.is_file():
            return ActivationStats.load(path, model=self.base)
        part = self.calibration_part(name)
        with showing(False):
            stats = calibrate_corpus(self.base, calibration_batches(self.tok, part, self.settings),
                                     provenance(self.args.model, part, self.settings), second_moment=True,
                                     layer_importance=True, skip_loss=self.args.layer_score == "skip-loss")
        path.parent.mkdir(exist_ok=True)
        stats.save(path)
        return stats

    def width_config(self, size: int) -> PruneConfig:
        return PruneConfig(intermediate_size=size, method=self.args.method, reconstruct=self.args.reconstruct)

    def build(self, p: EqualSizePlan, name: str):
        if p.kind == "depth":
            stats = self.stats(name)
            return prune_depth(self.base, DepthConfig(p.remove_layers, self.args.layer_score), stats.depth,
                               statistics=stats.meta).model
        if p.kind == "width":
            return prune(self.base, self.stats(name), self.width_config(p.intermediate_size)).model
        with showing(False):
            return prune_depth_with_corpus(self.base, self.tok, DepthConfig(p.remove_layers, self.args.layer_score),
                                           self.width_config(p.intermediate_size), stats=self.stats(name),
                                           corpus=self.calibration_part(name), settings=self.settings).model

    def command(self, p: EqualSizePlan | None, name: str) -> str:
        a = self.args
        if p is None:
            return f"glu-prune eval --model {a.model} ..."
        parts = [f"glu-prune prune --model {a.model} --corpus {name} --max-tokens {a.calib_tokens}"]
        if p.remove_layers:
            parts.append(f"--remove-layers {p.remove_layers} --layer-score {a.layer_score}")
        if p.intermediate_size is not None:
            parts.append(f"--intermediate-size {p.intermediate_size} --method {a.method} "
                         f"--reconstruct {a.reconstruct}")
        return " ".join(parts + ["--out OUT"])

    def cells(self):
        """(key, plan or None for the base, calibration corpus) in the order they run: corpus, kind, ratio
        (depth and width share one calibration; both calibrates again after its layer removal)."""
        yield "base", None, ""
        for c in self.calibration:
            for kind in parse_list(self.args.kinds, str, "--kinds"):
                for ratio in parse_list(self.args.param_ratios, float, "--param-ratios"):
                    yield f"{kind}-{ratio:g}-{c.name}", plan(self.profile, ratio, kind), c.name

    def model(self, key: str, p: EqualSizePlan | None, name: str):
        """(the model of a cell, the seconds its pruning took). A model that calibrates the remaining layers
        (both) is saved in DIR/models/ and reloaded for the next evaluation corpus."""
        if p is None:
            return self.base, 0.0
        saved = self.out / "models" / key
        if saved.is_dir():
            return load_pruned(saved, dtype=torch.float32), float((saved / "prune_seconds").read_text())
        start = time.perf_counter()
        model = self.build(p, name)
        seconds = time.perf_counter() - start
        if parameter_count(model) != p.parameters:
            raise RuntimeError(f"{key}: {parameter_count(model)} parameters, {p.parameters} predicted")
        if p.kind == "both" and len(self.corpora) > 1:
            saved.parent.mkdir(parents=True, exist_ok=True)
            save_pruned(model, self.tok, saved)
            write_text(saved / "prune_seconds", f"{seconds:.1f}")
        return model, seconds

    def run(self) -> None:
        """Every cell on the first evaluation corpus, then every cell on the next one."""
        cells = list(self.cells())  # a bad ratio or kind fails before any work
        for corpus in [c.name for c in self.corpora]:
            for key, p, name in cells:
                if self.store.done(key, corpus):
                    continue
                model, seconds = self.model(key, p, name)
                result = protocol_perplexity(model, self.tok, self.eval_parts[corpus], self.args.eval_tokens,
                                             self.args.eval_docs, seq_len=self.args.seq_len)
                self.store.add({"model": key, "kind": p.kind if p else "base", "param_ratio": p.param_ratio if p
                                else 0.0, "calibration_corpus": name, "eval_corpus": corpus,
                                "perplexity": result.perplexity, "tokens": result.tokens,
                                "parameters": parameter_count(model),
                                "remove_layers": p.remove_layers if p else 0,
                                "intermediate_size": p.intermediate_size if p and p.intermediate_size else
                                self.profile.intermediate, "prune_seconds": round(seconds, 1),
                                "command": self.command(p, name)})
                print(f"{key} on {corpus}: perplexity {result.perplexity:.2f}", flush=True)
                self.write_report()

    def write_report(self) -> None:
        corpora = [c.name for c in self.corpora]
        text = "# Depth vs width at equal parameter counts\n\n" + results_table(self.store.rows, corpora)
        write_text(self.out / "results.md", text)
        plot(self.store.rows, corpora, self.out / "depth_vs_width.png")

    def speed(self, turns: int, prompt: int, new_tokens: int) -> list[dict]:
        """Prefill and decode speed of the base and every plan's shape, in turns. Speed depends only on the
        shape, so the layers and neurons cut here are the first ones (no calibration)."""
        models = {"base": self.base}
        for ratio in parse_list(self.args.param_ratios, float, "--param-ratios"):
            for kind in parse_list(self.args.kinds, str, "--kinds"):
                p = plan(self.profile, ratio, kind)
                model = self.base
                if p.remove_layers:
                    model = prune_depth(model, DepthConfig(tuple(range(p.remove_layers)))).model
                if p.intermediate_size is not None:
                    model = prune(model, None, PruneConfig(intermediate_size=p.intermediate_size, method="l2")).model
                models[f"{kind}-{ratio:g}"] = model
        vocab = self.base.config.vocab_size
        prompts, decode_prompt = {prompt: prompt_ids(prompt, vocab)}, prompt_ids(32, vocab, seed=1)
        figures: dict[str, list[dict]] = {k: [] for k in models}
        for _ in range(turns):
            for key, model in models.items():
                figures[key].append(measure_turn(TorchEngine(model), prompts, decode_prompt, new_tokens))
        rows = []
        for key, turns_ in figures.items():
            prefill = st.median(t["prefill_tps"][prompt] for t in turns_)
            decode_ = st.median(t["decode_tps"] for t in turns_)
            rows.append({"model": key, "parameters": parameter_count(models[key]), "prefill_tps": prefill,
                         "decode_tps": decode_, "turns": turns})
        base = rows[0]
        for row in rows:
            row["prefill_x"], row["decode_x"] = row["prefill_tps"] / base["prefill_tps"], \
                row["decode_tps"] / base["decode_tps"]
        write_text(self.out / "speed.json", json.dumps(rows, indent=1))
        return rows


def results_table(rows: list[dict], corpora: list[str]) -> str:
    """One line per model: parameters, layers removed, kept neurons, perplexity on each corpus (and vs base)."""
    base = {r["eval_corpus"]: r["perplexity"] for r in rows if r["kind"] == "base"}
    models = list(dict.fromkeys(r["model"] for r in rows))
    head = ["model", "calibrated on", "parameters", "layers removed", "neurons per layer",
            *(f"{c} ppl (x base)" for c in corpora)]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for key in models:
        mine = {r["eval_corpus"]: r for r in rows if r["model"] == key}
        r = next(iter(mine.values()))
        cells = [f"{mine[c]['perplexity']:.2f} ({mine[c]['perplexity'] / base[c]:.2f})" if c in mine and c in base
                 else "-" for c in corpora]
        lines.append(f"| {key} | {r['calibration_corpus'] or '-'} | {r['parameters'] / 1e6:.2f}M | "
                     f"{r['remove_layers']} | {r['intermediate_size']} | " + " | ".join(cells) + " |")
    commands = [f"- `{key}`: `{next(r['command'] for r in rows if r['model'] == key)}`" for key in models]
    return "\n".join(lines) + "\n\nCommands (evaluate each with `glu-prune eval`):\n\n" + "\n".join(commands) + "\n"


def speed_table(rows: list[dict]) -> str:
    lines = ["| shape | parameters | prefill tok/s (x base) | decode tok/s (x base) |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {r['model']} | {r['parameters'] / 1e6:.2f}M | {r['prefill_tps']:.0f} ({r['prefill_x']:.2f}) | "
              f"{r['decode_tps']:.1f} ({r['decode_x']:.2f}) |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], corpora: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(corpora), figsize=(5 * len(corpora), 4), squeeze=False)
    base = {r["eval_corpus"]: r for r in rows if r["kind"] == "base"}
    for ax, corpus in zip(axes[0], corpora):
        for kind in PLANS:
            for calib in dict.fromkeys(r["calibration_corpus"] for r in rows if r["kind"] == kind):
                pts = sorted((r["parameters"] / 1e6, r["perplexity"]) for r in rows if r["kind"] == kind
                             and r["calibration_corpus"] == calib and r["eval_corpus"] == corpus)
                if corpus in base:
                    pts.append((base[corpus]["parameters"] / 1e6, base[corpus]["perplexity"]))
                pts.sort()
                ax.plot(*zip(*pts), marker="o", label=f"{kind}, calibrated on {calib}")
        ax.set(title=f"evaluated on {corpus}", xlabel="parameters (M)", ylabel="perplexity", yscale="log")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.studies.depth_vs_width",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--param-ratios", default="0.1,0.2", help="fractions of the total parameters removed")
    p.add_argument("--kinds", default=",".join(PLANS), help="comma-separated: depth, width, both")
    p.add_argument("--corpora", default="wikitext2,sms_spam", help="evaluation corpora")
    p.add_argument("--calibrate-on", default=None, help="calibration corpora (default: --corpora), in this order")
    p.add_argument("--layer-score", default="cosine", choices=["cosine", "skip-loss"])
    p.add_argument("--method", default="hybrid")
    p.add_argument("--reconstruct", default="lstsq")
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--eval-tokens", type=int, default=8192)
    p.add_argument("--eval-docs", type=int, default=400)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--speed", action="store_true", help="only measure speed (prefill and decode), then report")
    p.add_argument("--speed-turns", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    study = Study(args)
    if args.speed:
        print(speed_table(study.speed(args.speed_turns, 512, 64)))
        return
    study.run()
    study.write_report()
    print((study.out / "results.md").read_text())


if __name__ == "__main__":
    main()
