"""``prune``: remove GLU neurons (and, with ``--remove-layers``, decoder layers) and save the smaller model."""

from __future__ import annotations

import argparse
import time

from benchmarks.measures import parameter_count
from calibrate.errors import GluPruneError
from calibrate.files import check_output
from calibrate.manifest import Manifest
from calibrate.models import load_model, pick_device, pick_dtype
from calibrate.offload import OffloadChoice
from calibrate.stats import ActivationStats
from glu_prune_cli.options import (
    add_calibration_options,
    add_corpus_options,
    add_model_options,
    add_offload_option,
    add_output_options,
    add_prune_options,
    config_from_args,
    corpus_or_none,
    depth_from_args,
    settings_from_args,
)
from pruning.save import save_pruned
from pruning.workflow import (
    OffloadSettings,
    offload_choice,
    prune_depth_with_corpus,
    prune_offloaded,
    prune_with_corpus,
)


def add_prune(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--stats", default=None, help="statistics file from glu-prune calibrate")
    add_corpus_options(p, part="calibration", required=False, task=True)
    add_calibration_options(p, second_moment=False)
    add_prune_options(p)
    add_offload_option(p, "never build the whole model: calibrate layer by layer and rewrite the checkpoint shard "
                          "by shard")
    p.add_argument("--spill-dir", default=None,
                   help="offloaded: where statistics and refitted weights wait on disk when they would not fit in "
                        "memory (default: beside --out; the bytes are said and checked first)")
    add_output_options(p, "output model directory")


def run_prune(args) -> None:
    check_output(args.out, args.force)
    config = config_from_args(args)  # a bad setting fails before anything loads
    depth = depth_from_args(args)
    corpus = corpus_or_none(args, "calibration")
    start = time.perf_counter()
    if depth is not None:
        run_depth(args, config, depth, corpus, start)
        return
    if args.offload and args.device_map is not None:
        raise GluPruneError("--offload runs on one device: drop --device-map")
    run = offload_choice(args.model, config, calibrating=args.stats is None and corpus is not None,
                         dtype=pick_dtype(args.dtype), asked=args.offload) if args.device_map is None \
        else OffloadChoice(False, "--device-map")
    if run:
        stats = ActivationStats.load(args.stats) if args.stats is not None else None
        offload = OffloadSettings(pick_device(args.device), pick_dtype(args.dtype), args.spill_dir, run.note)
        result = prune_offloaded(args.model, args.out, config, offload, stats=stats, corpus=corpus,
                                 settings=settings_from_args(args), force=args.force)
        report(args, result.manifest, None, start)
        return
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    stats = ActivationStats.load(args.stats, model=model) if args.stats is not None else None
    result = prune_with_corpus(model, tokenizer, config, stats=stats, corpus=corpus,
                               settings=settings_from_args(args), inplace=True, notes=run.note)
    save_pruned(result.model, tokenizer, args.out, force=args.force)
    report(args, result.manifest, parameter_count(result.model), start)


def run_depth(args, config, depth, corpus, start: float) -> None:
    """--remove-layers, then the width target if any: in memory, on one device."""
    if args.offload or args.device_map is not None:
        raise GluPruneError("--remove-layers runs in memory on one device: drop --offload and --device-map")
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    stats = ActivationStats.load(args.stats, model=model) if args.stats is not None else None
    result = prune_depth_with_corpus(model, tokenizer, depth, config, stats=stats, corpus=corpus,
                                     settings=settings_from_args(args), inplace=True)
    save_pruned(result.model, tokenizer, args.out, force=args.force)
    report(args, result.manifest, parameter_count(result.model), start, width=config is not None)


def report(args, manifest: Manifest, params: int | None, start: float, width: bool = True) -> None:
    sizes = manifest.intermediate_sizes
    size = f"{params / 1e6:.1f}M parameters; " if params else "streamed shard by shard; "
    depth = manifest.depth
    layers = (f"removed layers {','.join(map(str, depth['removed_layers']))} ({depth['score']}, "
              f"{len(depth['kept_layers'])} left), " if depth else "")
    neurons = f"{args.method}, reconstruct {manifest.reconstruct}, " if width else ""
    seconds = manifest.extra["seconds"] if width else depth["seconds"]
    print(f"wrote {args.out}: {layers}{neurons}intermediate sizes {min(sizes)}..{max(sizes)}, {size}"
          f"select + cut + refit took {seconds:.2f} s, {time.perf_counter() - start:.1f} s in all")
