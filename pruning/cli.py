"""The ``glu-prune`` command: one subcommand per step of the pipeline."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

from calibrate.errors import GluPruneError

COMMANDS: dict[str, tuple] = {}


def command(name: str, help: str):
    """Register ``add(parser)`` / ``run(args)`` pairs as a subcommand."""

    def register(add):
        COMMANDS[name] = (help, add)
        return add

    return register


def add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m",
                   help="hub id, local model directory, .gguf file, or alias (default: smollm2-135m)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N (default: cuda when available)")
    p.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16, float64")
    p.add_argument("--device-map", default=None,
                   help="spread the model over several GPUs with accelerate (e.g. auto) instead of --device")


def add_corpus_options(p: argparse.ArgumentParser, part: str, required: bool = True) -> None:
    p.add_argument("--corpus", required=required,
                   help="wikitext2, sms_spam, a .txt/.jsonl/.json/.csv/.parquet file, a folder of .txt, "
                        "or a hub dataset name[:config]")
    p.add_argument("--part", default=None, help=f"calibration, evaluation or all (default: {part})")
    p.add_argument("--split", default=None, help="a raw split name instead of --part (e.g. test, validation)")
    p.add_argument("--data-dir", default=None,
                   help="local corpora laid out as shared/data (default: $GLU_DATA_DIR, else the hub)")
    p.add_argument("--text-field", default=None, help="text column of a jsonl/csv/parquet/hub corpus")


def corpus_from_args(args, default_part: str):
    from calibrate.corpora import load_corpus

    part = args.part if args.part or args.split else default_part
    return load_corpus(args.corpus, part=part, split=args.split, data_dir=args.data_dir,
                       text_field=args.text_field)


def positive(kind):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not a {kind.__name__}") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"'{text}' must be positive")
        return value

    return parse


@command("eval", "perplexity of a model on a corpus (PROTOCOL.md)")
def add_eval(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_corpus_options(p, part="evaluation")
    p.add_argument("--seq-len", type=positive(int), default=512, help="window length for documents (default 512)")
    p.add_argument("--max-tokens", type=positive(int), default=None, help="first N tokens of a document corpus")
    p.add_argument("--max-docs", type=positive(int), default=None, help="first N messages of a message corpus")
    p.add_argument("--batch-size", type=positive(int), default=1)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(run=run_eval)


def run_eval(args) -> None:
    from calibrate.models import load_model
    from calibrate.perplexity import perplexity

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


def add_calibration_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=positive(int), default=128, help="calibration sequence length (default 128)")
    p.add_argument("--max-tokens", type=positive(int), default=8192, help="calibration tokens (default 8192)")
    p.add_argument("--batch-size", type=positive(int), default=8)
    p.add_argument("--packing", action=argparse.BooleanOptionalAction, default=None,
                   help="pack text into full rows (default: on for documents, off for messages)")
    p.add_argument("--second-moment", action="store_true",
                   help="also keep sum x xᵀ per layer, and a held-out eighth of the batches (for --reconstruct)")


def calibration_batches(args, tokenizer) -> tuple[list[dict], dict]:
    """The batches of ``--corpus``'s calibration part under the calibration options, and their metadata."""
    from calibrate.batches import make_batches

    corpus = corpus_from_args(args, "calibration")
    batches = list(make_batches(tokenizer, corpus, seq_len=args.seq_len, max_tokens=args.max_tokens,
                                batch_size=args.batch_size, packing=args.packing))
    meta = {"model": args.model, "corpus": corpus.name, "source": corpus.source, "part": corpus.part,
            "seq_len": str(args.seq_len)}
    return batches, meta


def calibrate_from_args(args, model, tokenizer, layers=None, loader=None, device=None):
    """Calibrate ``model`` on ``--corpus`` with the calibration options of ``args`` (layer by layer
    from the checkpoint when a ``loader`` is given)."""
    from calibrate.glu import glu_layers
    from calibrate.layerwise import calibrate_layerwise
    from calibrate.run import calibrate, calibrate_with_holdout, split_holdout

    glu_layers(model, layers)  # an unsupported family or bad --layers fails before any work
    batches, meta = calibration_batches(args, tokenizer)
    if loader is not None:
        fit, held = split_holdout(batches) if args.second_moment else (batches, None)
        return calibrate_layerwise(model, fit, holdout_batches=held, layers=layers, second_moment=args.second_moment,
                                   meta=meta, loader=loader, device=device)
    if args.second_moment:
        return calibrate_with_holdout(model, batches, layers=layers, second_moment=True, meta=meta)
    return calibrate(model, batches, layers=layers, meta=meta)


def wants_offload(args) -> bool:
    """``--offload``, or a local checkpoint larger than 80% of the available memory (said on stderr)."""
    from calibrate.offload import checkpoint_bytes
    from calibrate.stats import available_memory, human_bytes

    if args.offload:
        return True
    size, free = checkpoint_bytes(args.model), available_memory()
    if size and free and size > 0.8 * free and args.device_map is None:
        print(f"note: the model ({human_bytes(size)}) would not fit in {human_bytes(free)} of memory: "
              f"calibrating layer by layer (--offload)", file=sys.stderr)
        return True
    return False


def refuse_existing(path: str, force: bool) -> None:
    """Check an output path before any work: not there yet (or --force), in an existing folder."""
    if os.path.exists(path) and not force:
        raise GluPruneError(f"{path} already exists: pass --force to overwrite it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise GluPruneError(f"folder {parent} does not exist: create it or choose another --out")
    try:
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError:
        raise GluPruneError(f"folder {parent} is not writable: choose another --out") from None


@command("calibrate", "record activation statistics of every GLU MLP over a corpus")
def add_calibrate(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    add_corpus_options(p, part="calibration")
    add_calibration_options(p)
    p.add_argument("--layers", default=None, help="only these layers, e.g. 0-3,10")
    p.add_argument("--offload", action="store_true",
                   help="hold one decoder layer in memory at a time, read from the checkpoint (automatic when "
                        "the model would not fit)")
    p.add_argument("--out", required=True, help="statistics file (.safetensors)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out")
    p.set_defaults(run=run_calibrate)


def run_calibrate(args) -> None:
    from calibrate import distributed
    from calibrate.glu import parse_layers
    from calibrate.models import load_model

    refuse_existing(args.out, args.force)
    corpus_from_args(args, "calibration")  # bad corpus arguments fail before the model loads
    distributed.init_from_env(args.device)
    device = distributed.device_for_rank(args.device)
    if wants_offload(args):
        if distributed.world_size() > 1 or args.device_map is not None:
            raise GluPruneError("--offload runs in one process on one device: drop torchrun or --device-map")
        from calibrate.models import pick_device, pick_dtype
        from calibrate.offload import offload_model

        model, loader, tokenizer = offload_model(args.model, pick_device(device), pick_dtype(args.dtype))
        stats = calibrate_from_args(args, model, tokenizer, layers=parse_layers(args.layers), loader=loader,
                                    device=pick_device(device))
    else:
        model, tokenizer = load_model(args.model, device=device, dtype=args.dtype, device_map=args.device_map)
        stats = calibrate_from_args(args, model, tokenizer, layers=parse_layers(args.layers))
    if distributed.world_size() > 1:
        stats.meta["processes"] = str(distributed.world_size())
    if distributed.is_main():
        stats.save(args.out)
        print(f"wrote {args.out}: {stats.meta.get('tokens', '?')} tokens, {len(stats.layers)} layers"
              + (f", {distributed.world_size()} processes" if distributed.world_size() > 1 else ""))


@command("stats", "summarise a statistics file")
def add_stats(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", help="statistics file written by glu-prune calibrate")
    p.set_defaults(run=run_stats)


def run_stats(args) -> None:
    from calibrate.stats import ActivationStats, summary

    print(summary(ActivationStats.load(args.file)))


@command("prune", "remove GLU neurons and save the smaller model")
def add_prune(p: argparse.ArgumentParser) -> None:
    from pruning.pipeline import ALLOCATIONS, DEFAULT_METHOD
    from pruning.reconstruct import RECONSTRUCTIONS
    from pruning.scores import METHODS

    add_model_options(p)
    p.add_argument("--stats", default=None, help="statistics file from glu-prune calibrate")
    add_corpus_options(p, part="calibration", required=False)
    add_calibration_options(p)
    p.add_argument("--method", default=DEFAULT_METHOD, choices=list(METHODS),
                   help=f"neuron score (default {DEFAULT_METHOD})")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--ratio", type=float, help="fraction of neurons removed, in (0, 1)")
    target.add_argument("--expansion-ratio", type=float, help="kept intermediate size / hidden size")
    target.add_argument("--intermediate-size", type=int, help="kept neurons per layer")
    p.add_argument("--multiple-of", type=int, default=1, help="round kept counts down to a multiple of N")
    p.add_argument("--allocation", default="uniform", choices=list(ALLOCATIONS),
                   help="uniform (same size everywhere), global (standardised scores ranked across layers), owl "
                        "(more kept where the down projection has more activation outliers) or sensitivity (more "
                        "kept where pruning that layer alone costs more perplexity on calibration data)")
    add_spread_option(p)
    p.add_argument("--reconstruct", default="auto", choices=["auto", *RECONSTRUCTIONS],
                   help="compensate removed neurons from the statistics (default auto: lstsq when second "
                        "moments are available or affordable, else none; lstsq needs --second-moment)")
    p.add_argument("--offload", action="store_true",
                   help="never build the whole model: calibrate layer by layer and rewrite the checkpoint shard by "
                        "shard (automatic when the model would not fit)")
    p.add_argument("--sequential", action="store_true",
                   help="calibrate on --corpus and prune one layer at a time, each layer measured on the model "
                        "whose earlier layers are already pruned (uniform allocation)")
    p.add_argument("--refit-target", default="pruned", choices=["pruned", "dense"],
                   help="with --sequential and lstsq: refit each layer toward its own output on the pruned model's "
                        "input (pruned, default) or toward the unpruned model's output on the same tokens (dense)")
    p.add_argument("--layers", default=None, help="prune only these layers, e.g. 0-3,10")
    p.add_argument("--seed", type=int, default=0, help="seed of the random method")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--force", action="store_true", help="replace an existing --out")
    p.set_defaults(run=run_prune)


def add_spread_option(p: argparse.ArgumentParser) -> None:
    from pruning.allocation import DEFAULT_SPREAD

    p.add_argument("--allocation-spread", type=float, default=DEFAULT_SPREAD,
                   help=f"owl/sensitivity: the layers' kept fractions average the target and span at most twice "
                        f"this (default {DEFAULT_SPREAD}; OWL uses 0.08)")


def run_prune(args) -> None:
    import time

    from calibrate.glu import glu_layers, parse_layers
    from calibrate.models import load_model
    from calibrate.stats import ActivationStats
    from pruning.allocation import check_spread
    from pruning.pipeline import check_bias_support, prune
    from pruning.plan import Target
    from pruning.reconstruct import NEEDS_SECOND_MOMENT, needs_second_moment
    from pruning.scores import needs_stats

    refuse_existing(args.out, args.force)
    Target(ratio=args.ratio, expansion_ratio=args.expansion_ratio, intermediate_size=args.intermediate_size,
           multiple_of=args.multiple_of)  # a bad target fails before anything loads
    check_spread(args.allocation_spread)
    layers = parse_layers(args.layers)
    if args.reconstruct == "auto":
        args.reconstruct = default_reconstruct(args)
    wants_stats = needs_stats(args.method) or args.reconstruct != "none"
    if wants_stats and args.stats is None and args.corpus is None:
        what = f"method '{args.method}'" if needs_stats(args.method) else f"--reconstruct {args.reconstruct}"
        raise GluPruneError(f"{what} needs calibration statistics: pass --stats FILE or --corpus NAME")
    if args.sequential and (args.corpus is None or args.stats is not None or args.allocation != "uniform"):
        raise GluPruneError("--sequential calibrates as it prunes: pass --corpus (not --stats) and uniform allocation")
    if args.refit_target == "dense" and not args.sequential:
        raise GluPruneError("--refit-target dense pairs the pruned and unpruned models layer by layer: "
                            "add --sequential")
    if args.allocation == "sensitivity" and args.corpus is None:
        raise GluPruneError("--allocation sensitivity measures each layer's perplexity cost on calibration data: "
                            "pass --corpus NAME")
    if wants_offload(args):
        return run_streamed(args, layers)
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    check_bias_support(model, args.reconstruct)
    glu_layers(model, layers)
    if args.sequential:
        return run_sequential(args, model, tokenizer, layers)
    stats = None
    if args.stats is not None:
        stats = ActivationStats.load(args.stats, model=model)
        if args.reconstruct in NEEDS_SECOND_MOMENT and any(s.second_moment is None for s in stats.layers.values()):
            raise GluPruneError(f"--reconstruct {args.reconstruct} needs second-moment statistics, which {args.stats} "
                                f"lacks: recalibrate with --second-moment")
    elif args.corpus is not None and wants_stats:
        args.second_moment = args.second_moment or needs_second_moment(args.method, args.reconstruct)
        stats = calibrate_from_args(args, model, tokenizer)
    held = None
    if args.allocation == "sensitivity":
        from calibrate.run import split_holdout

        held = split_holdout(calibration_batches(args, tokenizer)[0])[1]
    start = time.perf_counter()
    prune(model, stats=stats, method=args.method, ratio=args.ratio, expansion_ratio=args.expansion_ratio,
          intermediate_size=args.intermediate_size, multiple_of=args.multiple_of, allocation=args.allocation,
          layers=layers, seed=args.seed, reconstruct_with=args.reconstruct, spread=args.allocation_spread,
          sensitivity_batches=held, progress=True)
    save_and_report(args, model, tokenizer, f"select + cut + save took {time.perf_counter() - start:.2f} s")


def default_reconstruct(args) -> str:
    """``--reconstruct auto``: ``lstsq``, the best measured (README), whenever second moments are in
    the statistics file or the calibration can afford them; ``none`` otherwise. Said on stderr."""
    from calibrate.offload import checkpoint_bytes
    from calibrate.stats import available_memory

    if args.stats is not None:
        from safetensors import safe_open

        try:
            with safe_open(args.stats, "pt") as f:
                has_second = (f.metadata() or {}).get("second_moment") == "true"
        except Exception:
            has_second = False  # ActivationStats.load gives the proper error later
        choice, why = ("lstsq", "the statistics hold second moments") if has_second else \
            ("none", "the statistics have no second moments (calibrate with --second-moment for lstsq)")
    elif args.corpus is not None:
        size, free = checkpoint_bytes(args.model), available_memory()
        # float64 second moments: about 2/3 · intermediate/hidden times the float32 MLP weights
        affordable = args.offload or args.sequential or not (size and free and 4 * size > free)
        choice, why = ("lstsq", "calibrating with second moments") if affordable else \
            ("none", "second moments of every layer would not fit in memory (try --offload)")
    else:
        choice, why = "none", "no calibration data"
    print(f"note: --reconstruct {choice} ({why}); pass --reconstruct to choose", file=sys.stderr)
    return choice


def run_streamed(args, layers) -> None:
    import time

    from calibrate.models import pick_device, pick_dtype
    from calibrate.offload import offload_model
    from calibrate.stats import ActivationStats
    from pruning.plan import Target
    from pruning.reconstruct import needs_second_moment
    from pruning.scores import needs_stats
    from pruning.stream import prune_checkpoint

    if args.sequential or args.device_map is not None:
        raise GluPruneError("--offload prunes one-shot on one device: drop --sequential and --device-map")
    if args.allocation == "sensitivity":
        raise GluPruneError("--allocation sensitivity runs the whole model: drop --offload or use --allocation owl")
    device = pick_device(args.device)
    model, loader, tokenizer = offload_model(args.model, device, pick_dtype(args.dtype))
    stats = None
    if args.stats is not None:
        stats = ActivationStats.load(args.stats)
    elif args.corpus is not None and (needs_stats(args.method) or args.reconstruct != "none"):
        args.second_moment = args.second_moment or needs_second_moment(args.method, args.reconstruct)
        stats = calibrate_from_args(args, model, tokenizer, layers=layers, loader=loader, device=device)
    start = time.perf_counter()
    target = Target(ratio=args.ratio, expansion_ratio=args.expansion_ratio, intermediate_size=args.intermediate_size,
                    multiple_of=args.multiple_of)
    record = prune_checkpoint(model, loader, tokenizer, args.out, stats, args.method, target,
                              allocation=args.allocation, layers=layers, seed=args.seed,
                              reconstruct_with=args.reconstruct, force=args.force, spread=args.allocation_spread)
    sizes = record["intermediate_sizes"]
    print(f"wrote {args.out}: {args.method}, intermediate sizes {min(sizes)}..{max(sizes)}, streamed shard by "
          f"shard; select + cut + save took {time.perf_counter() - start:.2f} s")


def run_sequential(args, model, tokenizer, layers) -> None:
    import time

    from calibrate.run import split_holdout
    from pruning.pipeline import prune_sequential
    from pruning.reconstruct import NEEDS_SECOND_MOMENT

    start = time.perf_counter()
    batches, meta = calibration_batches(args, tokenizer)
    fit, held = split_holdout(batches) if args.reconstruct in NEEDS_SECOND_MOMENT else (batches, None)
    prune_sequential(model, fit, held, method=args.method, ratio=args.ratio, expansion_ratio=args.expansion_ratio,
                     intermediate_size=args.intermediate_size, multiple_of=args.multiple_of, layers=layers,
                     seed=args.seed, reconstruct_with=args.reconstruct, meta=meta, refit_target=args.refit_target)
    save_and_report(args, model, tokenizer, f"calibrate + prune + save took {time.perf_counter() - start:.2f} s")


def save_and_report(args, model, tokenizer, timing: str) -> None:
    from pruning.save import save_pruned

    save_pruned(model, tokenizer, args.out, model.glu_prune_manifest, force=args.force)
    sizes = model.glu_prune_manifest["intermediate_sizes"]
    params = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out}: {args.method}, intermediate sizes {min(sizes)}..{max(sizes)}, "
          f"{params / 1e6:.1f}M parameters; {timing}")


@command("heal", "distil a pruned model from its unpruned teacher on the calibration corpus")
def add_heal(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--teacher", required=True, help="the unpruned model (hub id, directory, .gguf or alias)")
    add_corpus_options(p, part="calibration")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=positive(int), default=None, help="optimiser steps (default 200)")
    budget.add_argument("--max-tokens", type=positive(int), default=None, help="training tokens instead of --steps")
    p.add_argument("--max-seconds", type=positive(float), default=None, help="stop after this much training time")
    p.add_argument("--seq-len", type=positive(int), default=256, help="training sequence length (default 256)")
    p.add_argument("--batch-size", type=positive(int), default=4)
    p.add_argument("--lr", type=positive(float), default=1e-4, help="peak learning rate (default 1e-4)")
    p.add_argument("--warmup-steps", type=int, default=10)
    p.add_argument("--temperature", type=positive(float), default=2.0, help="distillation temperature (default 2)")
    p.add_argument("--alpha", type=float, default=0.5, help="weight of the KL term; 1 - alpha on the LM loss")
    p.add_argument("--lora", type=positive(int), default=None, help="train LoRA adapters of rank R (peft), merged")
    p.add_argument("--gradient-checkpointing", action="store_true", help="trade compute for activation memory")
    p.add_argument("--autocast", action="store_true", help="bfloat16 autocast (GPUs)")
    p.add_argument("--checkpoint-every", type=positive(int), default=50, help="steps between checkpoints")
    p.add_argument("--resume", action="store_true", help="continue from OUT.heal-checkpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-corpora", default="wikitext2,sms_spam",
                   help="built-in names and NAME=PATH corpora measured before and after (with the training "
                        "corpus); 'none' to skip")
    p.add_argument("--eval-tokens", type=positive(int), default=8192, help="tokens per document corpus")
    p.add_argument("--eval-docs", type=positive(int), default=400, help="messages per message corpus")
    p.add_argument("--out", required=True, help="output model directory")
    p.add_argument("--force", action="store_true", help="replace an existing --out and any old checkpoint")
    p.set_defaults(run=run_heal)


def run_heal(args) -> None:
    import shutil
    from pathlib import Path

    from benchmarks.grid import parse_corpora
    from calibrate.corpora import load_corpus
    from calibrate.models import load_model
    from pruning.heal import HealConfig, heal, training_batches

    refuse_existing(args.out, args.force)
    checkpoint = Path(args.out).with_name(Path(args.out).name + ".heal-checkpoint")
    if checkpoint.exists() and not args.resume:
        if not args.force:
            raise GluPruneError(f"{checkpoint} holds an unfinished run: pass --resume to continue it, "
                                f"or --force to start over")
        shutil.rmtree(checkpoint)
    corpus = corpus_from_args(args, "calibration")
    specs = [] if args.eval_corpora == "none" else parse_corpora(args.eval_corpora)
    sources = {corpus.name: args.corpus, **{c.name: c.source for c in specs}} if specs else {}
    eval_parts = {name: load_corpus(source, part="evaluation", data_dir=args.data_dir, text_field=args.text_field,
                                    name=name) for name, source in sources.items()}
    student, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype, device_map=args.device_map)
    teacher, _ = load_model(args.teacher, device=args.device, dtype=args.dtype)
    batches = training_batches(tokenizer, corpus, seq_len=args.seq_len, batch_size=args.batch_size)
    tokens_per_step = max(1, sum(int(b["attention_mask"].sum()) for b in batches) // len(batches))
    steps = args.steps or (-(-args.max_tokens // tokens_per_step) if args.max_tokens else 200)
    config = HealConfig(steps=steps, lr=args.lr, warmup_steps=min(args.warmup_steps, steps // 10),
                        temperature=args.temperature, alpha=args.alpha, lora_rank=args.lora,
                        gradient_checkpointing=args.gradient_checkpointing, autocast=args.autocast,
                        checkpoint_every=args.checkpoint_every, seed=args.seed, max_seconds=args.max_seconds)
    before = measure(student, tokenizer, eval_parts, args)
    healed, history = heal(student, teacher, batches, config, checkpoint_dir=checkpoint, resume=args.resume)
    after = measure(healed, tokenizer, eval_parts, args)
    manifest = healed_manifest(args, healed, corpus, config, history, before, after)
    from pruning.save import save_pruned

    save_pruned(healed, tokenizer, args.out, manifest, force=args.force, card=healing_card(manifest["healing"]))
    shutil.rmtree(checkpoint, ignore_errors=True)
    changes = ", ".join(f"{n} {before[n]:.2f} -> {after[n]:.2f}" for n in before)
    print(f"wrote {args.out}: {len(history)} steps, {manifest['healing']['tokens']} tokens in "
          f"{manifest['healing']['seconds']:.0f} s; perplexity {changes or 'not measured'}")


def measure(model, tokenizer, parts: dict, args) -> dict[str, float]:
    from calibrate.perplexity import protocol_perplexity

    return {name: protocol_perplexity(model, tokenizer, part, args.eval_tokens, args.eval_docs).perplexity
            for name, part in parts.items()}


def healed_manifest(args, model, corpus, config, history: list[dict], before: dict, after: dict) -> dict:
    """The student's pruning.json (if any) with a ``healing`` section."""
    from dataclasses import asdict
    from pathlib import Path

    from pruning.save import MANIFEST

    source = Path(args.model, MANIFEST)
    manifest = json.loads(source.read_text()) if source.is_file() else {"base_model": args.teacher}
    manifest["healing"] = {
        "teacher": args.teacher, "corpus": corpus.name, "source": corpus.source, "part": corpus.part,
        "seq_len": args.seq_len, "batch_size": args.batch_size, "config": asdict(config), "steps": len(history),
        "tokens": sum(h["tokens"] for h in history), "seconds": history[-1]["seconds"] if history else 0.0,
        "final_loss": history[-1]["loss"] if history else None,
        "perplexity_before": before, "perplexity_after": after,
    }
    return manifest


def healing_card(healing: dict) -> str:
    lines = [f"## Healing\n\nDistilled from `{healing['teacher']}` on `{healing['corpus']}` "
             f"({healing['part']} part): {healing['steps']} steps, {healing['tokens']} tokens.\n"]
    if healing["perplexity_before"]:
        lines += ["| corpus (evaluation part) | before | after |", "| --- | ---: | ---: |"]
        lines += [f"| {name} | {value:.2f} | {healing['perplexity_after'][name]:.2f} |"
                  for name, value in healing["perplexity_before"].items()]
    return "\n".join(lines)


@command("compare", "cross-domain grid: calibrate on each corpus, prune, evaluate on every corpus")
def add_compare(p: argparse.ArgumentParser) -> None:
    add_model_options(p)
    p.add_argument("--corpora", default="wikitext2,sms_spam",
                   help="comma-separated: built-in names and NAME=PATH custom corpora")
    p.add_argument("--ratios", default="0.2,0.4", help="fractions of neurons removed (default 0.2,0.4)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: ppm,hybrid,wanda)")
    p.add_argument("--allocation", default="uniform",
                   help="comma-separated allocations, each a row per method: uniform, global, owl, sensitivity")
    add_spread_option(p)
    p.add_argument("--reconstruct", default="none",
                   help="comma-separated reconstructions, each a row per method (e.g. none,bias,lstsq)")
    p.add_argument("--schedule", default="one-shot",
                   help="comma-separated: one-shot (dense statistics), sequential (layer by layer, each layer "
                        "calibrated on the model with earlier layers already pruned) and/or sequential-dense "
                        "(the same, each refit toward the unpruned model's outputs)")
    p.add_argument("--heal-steps", type=positive(int), default=None,
                   help="also heal every pruned model for N steps on its calibration corpus (distilled from the base)")
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
    p.add_argument("--out", required=True, help="results folder (an existing one is resumed)")
    p.set_defaults(run=run_compare)


def run_compare(args) -> None:
    from benchmarks.compare import DEFAULT_METHODS, compare
    from benchmarks.grid import parse_corpora, parse_list
    from pruning.reconstruct import check_reconstruction

    corpora = parse_corpora(args.corpora)
    ratios = parse_list(args.ratios, float, "--ratios")
    methods = parse_list(args.methods, str, "--methods") if args.methods else DEFAULT_METHODS
    reconstruct = parse_list(args.reconstruct, str, "--reconstruct")
    for name in reconstruct:
        check_reconstruction(name)
    schedules = parse_list(args.schedule, str, "--schedule")
    rows = compare(args.model, corpora, ratios, methods, args.out, reconstruct=reconstruct, schedules=schedules,
                   heal_steps=args.heal_steps or 0, data_dir=args.data_dir,
                   eval_tokens=args.eval_tokens, eval_docs=args.eval_docs, calib_tokens=args.calib_tokens,
                   allocations=parse_list(args.allocation, str, "--allocation"), spread=args.allocation_spread,
                   batch_size=args.batch_size, device=args.device, dtype=args.dtype,
                   speed=args.speed, lm_eval=parse_list(args.lm_eval, str, "--lm-eval") if args.lm_eval else None,
                   lm_eval_include=args.lm_eval_include, lm_eval_limit=args.lm_eval_limit)
    print(open(os.path.join(args.out, "results.md")).read())
    print(f"{len(rows)} results in {args.out}/results.{{csv,json,md}}, plots in {args.out}/*.png")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glu-prune", description="Data-driven width pruning of GLU MLPs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add) in COMMANDS.items():
        add(sub.add_parser(name, help=help_text, description=help_text, parents=[common]))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    if args.debug:
        args.run(args)
        return 0
    try:
        args.run(args)
    except GluPruneError as exc:
        print(f"glu-prune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nglu-prune: interrupted; nothing partial was written", file=sys.stderr)  # after any progress bar
        return 130
    except Exception as exc:  # any other failure still gets one line; --debug shows the traceback
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"glu-prune: unexpected error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
