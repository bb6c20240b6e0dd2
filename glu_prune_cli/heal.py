"""``heal``: distil a pruned model from its unpruned teacher on the calibration part of a corpus."""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from benchmarks.grid.spec import parse_corpora
from calibrate.corpora import load_corpus
from calibrate.errors import GluPruneError
from calibrate.files import check_output
from calibrate.models import load_model
from glu_prune_cli.options import add_corpus_options, add_model_options, add_output_options, corpus_from_args, positive
from pruning.heal import HealConfig
from pruning.save import save_pruned
from pruning.workflow import HealSettings, heal_with_corpus


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
    p.add_argument("--warmup-steps", type=positive(int, zero=True), default=None,
                   help="steps of linear warm-up (default a tenth of the steps, at most 10)")
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
    add_output_options(p, "output model directory")


def run_heal(args) -> None:
    check_output(args.out, args.force)
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
    steps = args.steps or 200
    warmup = min(10, steps // 10) if args.warmup_steps is None else args.warmup_steps
    config = HealConfig(steps=steps, lr=args.lr, warmup_steps=warmup,
                        temperature=args.temperature, alpha=args.alpha, lora_rank=args.lora,
                        gradient_checkpointing=args.gradient_checkpointing, autocast=args.autocast,
                        checkpoint_every=args.checkpoint_every, seed=args.seed, max_seconds=args.max_seconds)
    run = HealSettings(seq_len=args.seq_len, batch_size=args.batch_size, max_tokens=args.max_tokens,
                       eval_parts=eval_parts, eval_tokens=args.eval_tokens, eval_docs=args.eval_docs,
                       checkpoint_dir=checkpoint, resume=args.resume)
    healed, record = heal_with_corpus(student, teacher, tokenizer, corpus, config, teacher_name=args.teacher, run=run)
    save_pruned(healed, tokenizer, args.out, force=args.force)
    shutil.rmtree(checkpoint, ignore_errors=True)
    before, after = record["perplexity_before"], record["perplexity_after"]
    changes = ", ".join(f"{n} {before[n]:.2f} -> {after[n]:.2f}" for n in before)
    print(f"wrote {args.out}: {record['steps']} steps, {record['tokens']} tokens in {record['seconds']:.0f} s; "
          f"perplexity {changes or 'not measured'}")
