"""``eval``, ``calibrate`` and ``stats``: perplexity, calibration statistics and their summary."""

from __future__ import annotations

import argparse
import json

from calibrate import distributed
from calibrate.errors import GluPruneError
from calibrate.files import check_output
from calibrate.glu import glu_layers, parse_layers
from calibrate.models import load_model, pick_device, pick_dtype
from calibrate.offload import offload_model, should_offload
from calibrate.perplexity import perplexity
from calibrate.stats import ActivationStats, summary
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
    add_corpus_options(p, part="evaluation")
    p.add_argument("--seq-len", type=positive(int), default=512, help="window length for documents (default 512)")
    p.add_argument("--max-tokens", type=positive(int), default=None, help="first N tokens of a document corpus")
    p.add_argument("--max-docs", type=positive(int), default=None, help="first N messages of a message corpus")
    p.add_argument("--batch-size", type=positive(int), default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")


def run_eval(args) -> None:
    corpus = corpus_from_args(args, "evaluation")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    result = perplexity(model, tokenizer, corpus, seq_len=args.seq_len, max_tokens=args.max_tokens,
                        max_docs=args.max_docs, batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print(json.dumps({**result.as_dict(), "model": args.model, "corpus": corpus.name, "part": corpus.part,
                          "seq_len": args.seq_len, "dtype": args.dtype}))
    else:
        print(f"{args.model} on {corpus.name} ({corpus.part}): perplexity {result.perplexity:.2f} "
              f"over {result.tokens} tokens in {result.sequences} sequences, "
              f"{result.seconds:.1f} s ({result.tokens_per_second:.0f} tok/s)")


def add_calibrate(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_corpus_options(p, part="calibration")
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
    if should_offload(args.model, args.offload):
        if distributed.world_size() > 1 or args.device_map is not None:
            raise GluPruneError("--offload runs in one process on one device: drop torchrun or --device-map")
        device = pick_device(device)
        model, loader, tokenizer = offload_model(args.model, device, pick_dtype(args.dtype))
    else:
        model, tokenizer = load_model(args.model, device=device, dtype=args.dtype, device_map=args.device_map)
    glu_layers(model, layers)  # an unsupported family or bad --layers fails before any work
    settings = settings_from_args(args)
    stats = calibrate_corpus(model, calibration_batches(tokenizer, corpus, settings),
                             provenance(args.model, corpus, settings), second_moment=args.second_moment,
                             layers=layers, loader=loader, device=device if loader else None,
                             layer_importance=args.layer_importance)
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
