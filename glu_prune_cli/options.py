"""Argument groups shared by several subcommands, and their translation into library objects."""

from __future__ import annotations

import argparse

from calibrate.corpora import Corpus, load_corpus
from calibrate.errors import GluPruneError
from calibrate.glu import parse_layers
from calibrate.layer_importance import SCORES
from calibrate.tasks import load_task, task_calibration_corpus
from calibrate.template_eval import DEFAULT_TASK_TEXT, TASK_TEXTS, templates_task_corpus
from pruning.allocation import DEFAULT_SPREAD
from pruning.config import PruneConfig
from pruning.depth import DepthConfig, parse_removal
from pruning.registry import ALLOCATIONS, AUTO, DEFAULT_METHOD, METHODS, MLP_TARGETS, RECONSTRUCTIONS, REFIT_TARGETS
from pruning.workflow import CalibrationSettings


def positive(kind, zero: bool = False):
    """An argparse type: a ``kind`` above zero (or at least zero, with ``zero``)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a {kind.__name__}") from None
        if value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"'{text}' must be " + ("zero or more" if zero else "positive"))
        return value

    return parse


def described(table: dict) -> str:
    return "; ".join(f"{name}: {getattr(entry, 'help', entry)}" for name, entry in table.items())


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="hub id, local model directory, .gguf file, or alias (default: smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, float64")
    p.add_argument("--device-map", default=None,
                   help="spread the model over several GPUs with accelerate (e.g. auto) instead of --device")


def add_corpus_options(p: argparse.ArgumentParser, part: str, required: bool = True, task: bool = False) -> None:
    """--corpus and its part options; with ``task``, --task (a labelled task's prompts) instead of --corpus."""
    p.add_argument("--corpus", required=required and not task,
                   help="wikitext2, sms_spam, a .txt/.jsonl/.json/.csv/.parquet file, a folder of .txt, "
                        "or a hub dataset name[:config]")
    if task:
        p.add_argument("--task", default=None,
                       help="instead of --corpus: calibrate on a labelled task as its few-shot prompts, each then "
                            "asking for the label of 'N/A' (sms_spam, the same as --corpus sms_spam:task-ref, or a "
                            ".csv/.jsonl/.json/.parquet file; docs/tasks.md)")
        p.add_argument("--label-field", default=None, help="label column of a --task file (default: label)")
        p.add_argument("--task-text", default=DEFAULT_TASK_TEXT, choices=TASK_TEXTS,
                       help=f"with --task: calibrate on the task's own prompts with the 'N/A' query (prompts), on "
                            f"its calibration prompt templates (templates), or on those and raw text, half each "
                            f"(templates-mix); default {DEFAULT_TASK_TEXT} (docs/tasks.md)")
        p.set_defaults(task_calibration=True)
    p.add_argument("--part", default=None, help=f"calibration, evaluation or all (default: {part})")
    p.add_argument("--split", default=None, help="a raw split name instead of --part (e.g. test, validation)")
    p.add_argument("--data-dir", default=None,
                   help="local corpora laid out as shared/data (default: $GLU_DATA_DIR, else the hub)")
    p.add_argument("--text-field", default=None, help="text column of a jsonl/csv/parquet/hub corpus")


def corpus_from_args(args, default_part: str) -> Corpus:
    if getattr(args, "task_calibration", False) and args.task is not None:
        if args.corpus is not None:
            raise GluPruneError("give --corpus or --task, not both")
        if args.split is not None or args.part not in (None, "calibration"):
            raise GluPruneError("--task calibrates on the task's calibration part: drop --part and --split")
        task = load_task(args.task, data_dir=args.data_dir, text_field=args.text_field, label_field=args.label_field)
        return task_calibration_corpus(task) if args.task_text == "prompts" else templates_task_corpus(task,
                                                                                                         args.task_text)
    if args.corpus is None:
        raise GluPruneError("give --corpus (or --task for a labelled task's prompts)")
    part = args.part if args.part or args.split else default_part
    return load_corpus(args.corpus, part=part, split=args.split, data_dir=args.data_dir, text_field=args.text_field)


def corpus_or_none(args, default_part: str) -> Corpus | None:
    """The corpus of --corpus or --task, or None when neither is given."""
    if args.corpus is None and getattr(args, "task", None) is None:
        return None
    return corpus_from_args(args, default_part)


def add_calibration_options(p: argparse.ArgumentParser, second_moment: bool = True) -> None:
    p.add_argument("--seq-len", type=positive(int), default=128, help="calibration sequence length (default 128)")
    p.add_argument("--max-tokens", type=positive(int), default=None,
                   help="calibration tokens (default 8192; prune with --reconstruct auto raises it to what a refit "
                        "of the kept width needs)")
    p.add_argument("--batch-size", type=positive(int), default=8)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="pack text into full rows (default: on for documents, off for messages)")
    if second_moment:
        p.add_argument("--second-moment", action="store_true",
                       help="also keep sum x xᵀ per layer, and a held-out eighth of the batches (for --reconstruct)")


def settings_from_args(args) -> CalibrationSettings:
    return CalibrationSettings(seq_len=args.seq_len, max_tokens=args.max_tokens, batch_size=args.batch_size,
                               packing=args.packing)


def add_spread_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allocation-spread", type=float, default=DEFAULT_SPREAD,
                   help=f"owl/sensitivity: the layers' kept fractions average the target and span at most twice "
                        f"this (default {DEFAULT_SPREAD}; OWL uses 0.08)")


def add_prune_options(p: argparse.ArgumentParser) -> None:
    """The options of :class:`pruning.config.PruneConfig`, named as its fields."""
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS),
                   help=f"neuron score (default {DEFAULT_METHOD}): {described(METHODS)}")
    target = p.add_mutually_exclusive_group()  # or --remove-layers alone
    target.add_argument("--ratio", type=float, help="fraction of neurons removed, in (0, 1)")
    target.add_argument("--expansion-ratio", type=float, help="kept intermediate size / hidden size")
    target.add_argument("--intermediate-size", type=int, help="kept neurons per layer")
    p.add_argument("--multiple-of", type=int, default=1, help="round kept counts down to a multiple of N")
    p.add_argument("--allocation", default="uniform", choices=list(ALLOCATIONS),
                   help=f"how kept neurons spread over layers (default uniform): {described(ALLOCATIONS)}")
    add_spread_option(p)
    p.add_argument("--reconstruct", default=AUTO, choices=[AUTO, *RECONSTRUCTIONS],
                   help=f"compensate removed neurons (default auto: lstsq when the statistics hold second moments "
                        f"or the model's layers afford them, else none): {described(RECONSTRUCTIONS)}")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate on --corpus and prune one layer at a time, each layer measured on the model "
                        "whose earlier layers are already pruned (uniform allocation)")
    p.add_argument("--refit-target", default="pruned", choices=list(REFIT_TARGETS),
                   help=f"with --sequential and lstsq: {described(REFIT_TARGETS)}")
    p.add_argument("--mlp-target", default="layer",
                   help=f"--reconstruct mlp / lstsq-local: what each kept MLP is fitted to: {described(MLP_TARGETS)}")
    p.add_argument("--mlp-steps", type=int, default=32, help="--reconstruct mlp: Adam steps per layer (default 32)")
    p.add_argument("--mlp-lr", type=float, default=1e-4, help="--reconstruct mlp: Adam's learning rate (default 1e-4)")
    p.add_argument("--layers", default=None, help="prune only these layers, e.g. 0-3,10")
    p.add_argument("--seed", type=int, default=0, help="seed of the random method")
    add_depth_options(p)


def add_depth_options(p: argparse.ArgumentParser) -> None:
    """The options of :class:`pruning.depth.DepthConfig`."""
    p.add_argument("--remove-layers", default=None,
                   help="remove whole decoder layers: N (the N least important by --layer-score) or a list "
                        "(3,7 or 4-6; one named layer: 5,); with a width target the neurons of the remaining "
                        "model are pruned after, on --corpus (--layers then names remaining layers)")
    p.add_argument("--layer-score", default="cosine", choices=list(SCORES),
                   help=f"how --remove-layers N ranks layers (default cosine): {described(SCORES)}")


def depth_from_args(args) -> DepthConfig | None:
    removal = parse_removal(args.remove_layers)
    return None if removal is None else DepthConfig(removal, args.layer_score)


def config_from_args(args) -> PruneConfig | None:
    """The width part of ``prune``; None when only --remove-layers is given."""
    if args.ratio is None and args.expansion_ratio is None and args.intermediate_size is None:
        if args.remove_layers is not None:
            return None
        raise GluPruneError("give --ratio, --expansion-ratio or --intermediate-size (neurons), --remove-layers "
                            "(decoder layers), or both")
    layers = parse_layers(args.layers)
    return PruneConfig(ratio=args.ratio, expansion_ratio=args.expansion_ratio,
                       intermediate_size=args.intermediate_size, multiple_of=args.multiple_of, method=args.method,
                       allocation=args.allocation, allocation_spread=args.allocation_spread,
                       reconstruct=args.reconstruct, schedule="sequential" if args.sequential else "one-shot",
                       refit_target=args.refit_target, seed=args.seed, mlp_target=args.mlp_target,
                       mlp_steps=args.mlp_steps, mlp_lr=args.mlp_lr,
                       layers=tuple(layers) if layers is not None else None)


def add_offload_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--offload", action="store_true",
                   help=f"{what} (automatic when the model would not fit in memory)")


def add_output_options(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--out", required=True, help=what)
    p.add_argument("--force", action="store_true", help="replace an existing --out")
