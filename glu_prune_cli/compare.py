"""``compare``: the cross-domain grid (calibrate on each corpus, prune, evaluate on every corpus)."""

from __future__ import annotations

import argparse
import os

from benchmarks.grid.compare import DEFAULT_METHODS, EQUAL_SIZE_METHODS, compare
from benchmarks.grid.spec import parse_corpora, parse_list
from calibrate.errors import GluPruneError
from calibrate.prompts import DEFAULT_REFERENCE
from glu_prune_cli.options import add_model_options, add_spread_option, positive


def add_compare(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--corpora", default="wikitext2,sms_spam",
                   help="comma-separated: built-in names and NAME=PATH custom corpora")
    p.add_argument("--calibrate-on", default=None, metavar="CORPORA",
                   help="comma-separated corpora to calibrate on, in the form of --corpora (default: the --corpora); "
                        "every model is evaluated on the --corpora only")
    p.add_argument("--ratios", default=None, help="fractions of GLU neurons removed (default 0.2,0.4)")
    p.add_argument("--param-ratios", default=None, metavar="RATIOS",
                   help="instead of --ratios: fractions of the model's total parameters removed by every method, "
                        "at equal size (docs/depth.md): depth-cosine and depth-skip-loss remove whole layers, a "
                        "width method (e.g. hybrid) uniform neurons, both-METHOD half of each")
    p.add_argument("--methods", default=None,
                   help=f"comma-separated methods (default: {','.join(DEFAULT_METHODS)}; with --param-ratios: "
                        f"{','.join(EQUAL_SIZE_METHODS)})")
    p.add_argument("--allocation", default="uniform",
                   help="comma-separated allocations, each a row per method: uniform, global, owl, sensitivity, "
                        "curve, curve-output (docs/allocation.md)")
    add_spread_option(p)
    p.add_argument("--reconstruct", default="none",
                   help="comma-separated reconstructions, each a row per method (e.g. none,bias,lstsq)")
    p.add_argument("--schedule", default="one-shot",
                   help="comma-separated: one-shot (dense statistics), sequential (layer by layer, each layer "
                        "calibrated on the model with earlier layers already pruned) and/or sequential-dense "
                        "(the same, each refit toward the unpruned model's outputs)")
    p.add_argument("--heal-steps", type=positive(int), default=None,
                   help="also heal every pruned model for N steps on its calibration corpus (distilled from the base), "
                        "and the unpruned model alike (the fair baseline)")
    p.add_argument("--heal-lora", type=positive(int), default=None, metavar="R",
                   help="with --heal-steps: train LoRA adapters of rank R (peft) instead of every weight")
    p.add_argument("--eval-tokens", type=positive(int), default=8192, help="tokens per document corpus")
    p.add_argument("--eval-docs", type=positive(int), default=400, help="messages per message corpus")
    p.add_argument("--calib-tokens", type=positive(int), default=8192, help="calibration tokens per corpus")
    p.add_argument("--batch-size", type=positive(int), default=4)
    p.add_argument("--data-dir", default=None, help="local corpora (default: $GLU_DATA_DIR, else the hub)")
    p.add_argument("--speed", action="store_true", help="also measure deployment speed of every model")
    p.add_argument("--lm-eval", default=None, metavar="TASKS",
                   help="comma-separated lm-evaluation-harness tasks run on every model (pip install "
                        "'glu-prune[lm-eval]')")
    p.add_argument("--lm-eval-include", default=None, metavar="DIR", help="folder of extra lm-eval task YAML files")
    p.add_argument("--lm-eval-limit", type=positive(int), default=None, help="first N documents of each task")
    p.add_argument("--tasks", default=None, metavar="TASKS",
                   help="comma-separated labelled tasks scored few-shot on every model: sms_spam, or .csv/.jsonl/"
                        ".json/.parquet files with text and label fields (docs/tasks.md)")
    p.add_argument("--task-shots", type=int, default=4, help="labelled examples in each task prompt (default 4)")
    p.add_argument("--task-size", type=positive(int), default=None,
                   help="evaluated examples per task, the same number per label (default: all of the rarest label, "
                        "as many of each other)")
    p.add_argument("--task-seed", type=int, default=0, help="seed of the shots and the evaluated subset (default 0)")
    p.add_argument("--task-reference", default=DEFAULT_REFERENCE,
                   help=f"content-free message whose label scores are subtracted (default {DEFAULT_REFERENCE!r})")
    p.add_argument("--out", required=True, help="results folder (an existing one is resumed)")


def run_compare(args) -> None:
    if args.heal_lora and not args.heal_steps:
        raise GluPruneError("--heal-lora sets how models are healed: give --heal-steps N too")
    methods = EQUAL_SIZE_METHODS if args.param_ratios else DEFAULT_METHODS
    rows = compare(args.model, parse_corpora(args.corpora),
                   parse_list(args.ratios, float, "--ratios") if args.ratios else None,
                   parse_list(args.methods, str, "--methods") if args.methods else methods, args.out,
                   param_ratios=parse_list(args.param_ratios, float, "--param-ratios") if args.param_ratios else None,
                   reconstruct=parse_list(args.reconstruct, str, "--reconstruct"),
                   schedules=parse_list(args.schedule, str, "--schedule"), heal_steps=args.heal_steps or 0,
                   heal_lora=args.heal_lora,
                   allocations=parse_list(args.allocation, str, "--allocation"), spread=args.allocation_spread,
                   data_dir=args.data_dir, eval_tokens=args.eval_tokens, eval_docs=args.eval_docs,
                   calib_tokens=args.calib_tokens, batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                   speed=args.speed, lm_eval=parse_list(args.lm_eval, str, "--lm-eval") if args.lm_eval else None,
                   lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit,
                   tasks=parse_list(args.tasks, str, "--tasks") if args.tasks else None, task_shots=args.task_shots,
                   task_size=args.task_size, task_seed=args.task_seed, task_reference=args.task_reference,
                   calibration_corpora=parse_corpora(args.calibrate_on) if args.calibrate_on else None)
    print(open(os.path.join(args.out, "results.md")).read())
    print(f"{len(rows)} results in {args.out}/results.{{csv,json,md}}, plots in {args.out}/*.png")
