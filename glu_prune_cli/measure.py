"""``eval``, ``calibrate`` and ``stats``: perplexity or a labelled task, calibration statistics and their summary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from calibrate import distributed
from calibrate.errors import GluPruneError
from calibrate.files import check_output
from calibrate.glu import glu_layers, parse_layers
from calibrate.models import load_model, pick_device, pick_dtype
from calibrate.offload import OffloadChoice, Offloaded, offload_model, should_offload
from calibrate.perplexity import perplexity
from calibrate.prompts import DEFAULT_REFERENCE
from calibrate.resources import human_bytes
from calibrate.stats import ActivationStats, summary
from calibrate.tasks import TaskResult, evaluate_task, load_task
from calibrate.template_eval import TemplateReport, evaluate_templates
from calibrate.templates import pick_templates
from glu_prune_cli.options import (
    add_calibration_options,
    add_corpus_options,
    add_model_options,
    add_offload_option,
    add_output_options,
    corpus_from_args,
    positive,
    settings_from_args,
)
from pruning.workflow import calibrate_corpus, calibration_batches, provenance


def add_eval(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_corpus_options(p, part="evaluation", required=False)
    p.add_argument("--seq-len", type=positive(int), default=512, help="window length for documents (default 512)")
    p.add_argument("--max-tokens", type=positive(int), default=None, help="first N tokens of a document corpus")
    p.add_argument("--max-docs", type=positive(int), default=None, help="first N messages of a message corpus")
    p.add_argument("--batch-size", type=positive(int), default=None, help="sequences per forward (default 1; "
                                                                           "16 with --task)")
    add_task_options(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def add_task_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", default=None, help="instead of --corpus: few-shot accuracy on a labelled task, sms_spam "
                                                "or a .csv/.jsonl/.json/.parquet file (docs/tasks.md)")
    p.add_argument("--label-field", default=None, help="label column of a --task file (default: label)")
    p.add_argument("--shots", type=int, default=4, help="labelled examples in the prompt, from the calibration "
                                                        "part (default 4)")
    p.add_argument("--task-size", type=positive(int), default=None,
                   help="evaluated examples, the same number per label (default: all of the rarest label, as many "
                        "of each other)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shots and of the evaluated subset (default 0)")
    p.add_argument("--reference", default=DEFAULT_REFERENCE,
                   help=f"content-free message whose label scores are subtracted before choosing (default "
                        f"{DEFAULT_REFERENCE!r}; docs/tasks.md)")
    p.add_argument("--no-reference", dest="reference", action="store_const", const=None,
                   help="choose the label by its plain log-likelihood")
    p.add_argument("--templates", default=None, metavar="NAMES",
                   help="score the task under prompt templates instead: all, unseen (all but default) or "
                        "comma-separated names (docs/tasks.md); one row per template and the spread")


def task_line(model: str, result: TaskResult) -> str:
    low, high = result.balanced_accuracy_ci
    recall = ", ".join(f"{label} {value:.3f}" for label, value in result.recall.items())
    area = f", AUC {result.auc:.3f} [{result.auc_ci[0]:.3f}, {result.auc_ci[1]:.3f}]" if result.auc is not None \
        else f" ({result.note})"
    plain = f"; plain choice {result.plain_balanced_accuracy:.3f}" if result.reference is not None else ""
    return (f"{model} on task {result.task} ({result.n} evaluation examples, {result.shots} shots): balanced accuracy "
            f"{result.balanced_accuracy:.3f} [{low:.3f}, {high:.3f}]{area}; recall {recall}{plain}; "
            f"{result.seconds:.1f} s")


def template_rows(model: str, report: TemplateReport) -> str:
    """The report as a table: one row per template, then the spread."""
    lines = [f"{model} on task {report.task} ({report.results[0].n} evaluation examples) under "
             f"{len(report.results)} templates", f"{'template':<12} {'shots':>5} {'reference':>10} "
             f"{'balanced accuracy':>26} {'AUC':>22} {'plain':>6}"]
    for r in report.results:
        low, high = r.balanced_accuracy_ci
        area = f"{r.auc:.3f} [{r.auc_ci[0]:.3f}, {r.auc_ci[1]:.3f}]" if r.auc is not None else "-"
        ref = repr(r.reference) if r.reference is not None else "none"
        lines.append(f"{r.template:<12} {r.shots:>5} {ref:>10} {r.balanced_accuracy:>9.3f} [{low:.3f}, {high:.3f}]"
                     f" {area:>22} {r.plain_balanced_accuracy:>6.3f}")
    for figure in ("balanced_accuracy", "auc"):
        spread = report.spread(figure)
        if spread is not None:
            lines.append(f"{figure.replace('_', ' ')}: min {spread[0]:.3f}, max {spread[1]:.3f}")
    return "\n".join(lines)


def run_task_eval(args) -> None:
    task = load_task(args.task, data_dir=args.data_dir, text_field=args.text_field, label_field=args.label_field)
    templates = pick_templates(task.name, args.templates) if args.templates is not None else None
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    if templates is not None:
        report = evaluate_templates(model, tokenizer, task, templates, size=args.task_size, seed=args.seed,
                                    batch_size=args.batch_size or 16)
        print(json.dumps({**report.to_dict(), "model": args.model, "dtype": args.dtype}) if args.json
              else template_rows(args.model, report))
        return
    result = evaluate_task(model, tokenizer, task, shots=args.shots, size=args.task_size, seed=args.seed,
                           reference=args.reference, batch_size=args.batch_size or 16)
    if args.json:
        print(json.dumps({**result.to_dict(), "model": args.model, "dtype": args.dtype}))
    else:
        print(task_line(args.model, result))


def run_eval(args) -> None:
    if (args.corpus is None) == (args.task is None):
        raise GluPruneError("eval needs --corpus (perplexity) or --task (a labelled task), one of them")
    if args.task is not None:
        return run_task_eval(args)
    corpus = corpus_from_args(args, "evaluation")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    result = perplexity(model, tokenizer, corpus, seq_len=args.seq_len, max_tokens=args.max_tokens,
                        max_docs=args.max_docs, batch_size=args.batch_size or 1)
    if args.json:
        print(json.dumps({**result.as_dict(), "model": args.model, "corpus": corpus.name, "part": corpus.part,
                          "seq_len": args.seq_len, "dtype": args.dtype}))
    else:
        print(f"{args.model} on {corpus.name} ({corpus.part}): perplexity {result.perplexity:.2f} "
              f"over {result.tokens} tokens in {result.sequences} sequences, "
              f"{result.seconds:.1f} s ({result.tokens_per_second:.0f} tok/s)")


def add_calibrate(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_corpus_options(p, part="calibration", task=True)
    add_calibration_options(p)
    p.add_argument("--layers", default=None, help="only these layers, e.g. 0-3,10")
    p.add_argument("--layer-importance", action="store_true",
                   help="also record each decoder layer's importance for --remove-layers: the cosine of its input "
                        "and output, and the held-out loss increase when it alone is skipped (in memory only)")
    add_offload_option(p, "hold one decoder layer in memory at a time, read from the checkpoint")
    add_output_options(p, "statistics file (.safetensors)")


def run_calibrate(args) -> None:
    check_output(args.out, args.force)
    corpus = corpus_from_args(args, "calibration")  # bad corpus arguments fail before the model loads
    layers = parse_layers(args.layers)
    distributed.init_from_env(args.device)
    device = distributed.device_for_rank(args.device)
    loader = None
    alone = distributed.world_size() == 1 and args.device_map is None
    if args.offload and not alone:
        raise GluPruneError("--offload runs in one process on one device: drop torchrun or --device-map")
    run = should_offload(args.model, args.offload, pick_dtype(args.dtype), second_moment=args.second_moment,
                         layers=layers) if alone else OffloadChoice(False, "torchrun or --device-map")
    if run and not args.offload and args.layer_importance:
        run = OffloadChoice(False, f"{run.why}, but --layer-importance runs in memory only")
    if run:
        device = pick_device(device)
        model, loader, tokenizer = offload_model(args.model, device, pick_dtype(args.dtype))
    else:
        model, tokenizer = load_model(args.model, device=device, dtype=args.dtype, device_map=args.device_map)
    glu_layers(model, layers)  # an unsupported family or bad --layers fails before any work
    settings = settings_from_args(args)
    stats = calibrate_corpus(model, calibration_batches(tokenizer, corpus, settings),
                             provenance(args.model, corpus, settings), second_moment=args.second_moment,
                             layers=layers, offloaded=Offloaded(loader, device) if loader else None,
                             layer_importance=args.layer_importance)
    stats.meta["run"] = ("offloaded: " if run else "in memory: ") + run.why
    if distributed.world_size() > 1:
        stats.meta["processes"] = str(distributed.world_size())
    if distributed.is_main():
        stats.save(args.out)
        print(f"wrote {args.out}: {stats.meta.get('tokens', '?')} tokens, {len(stats.layers)} layers"
              + (f", {distributed.world_size()} processes" if distributed.world_size() > 1 else ""))


def add_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="statistics file written by glu-prune calibrate")


def run_stats(args) -> None:
    print(summary(ActivationStats.load(args.file)))
    print(f"file: {human_bytes(Path(args.file).stat().st_size)}")
