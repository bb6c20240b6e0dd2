"""``speed``: deployment speed of the base model and its pruned copies in transformers and llama.cpp."""

from __future__ import annotations

import argparse
from pathlib import Path

from benchmarks.deploy.run import SpeedSettings, deploy_speed
from benchmarks.deploy.variants import DEFAULT_ENGINES, ENGINES, BuildSettings, model_specs
from benchmarks.grid.spec import parse_list
from glu_prune_cli.options import positive
from pruning.registry import METHODS


def add_speed(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="hub id, local model directory, .gguf or alias")
    p.add_argument("--ratios", default="0.2,0.4,0.6", help="fractions of GLU neurons removed (default 0.2,0.4,0.6)")
    p.add_argument("--multiple-of", default="1,64,256",
                   help="kept widths rounded down to each of these multiples: a model per ratio and multiple "
                        "(default 1,64,256)")
    p.add_argument("--method", default="hybrid", choices=list(METHODS), help="neuron score (default hybrid)")
    p.add_argument("--corpus", default="sms_spam", help="calibration corpus of the pruned models (default sms_spam)")
    p.add_argument("--calib-tokens", type=positive(int), default=4096, help="calibration tokens (default 4096)")
    p.add_argument("--data-dir", default=None, help="local corpora (default: $GLU_DATA_DIR, else the hub)")
    p.add_argument("--engines", default=",".join(DEFAULT_ENGINES),
                   help=f"comma-separated, from {', '.join(ENGINES)} (default {','.join(DEFAULT_ENGINES)})")
    p.add_argument("--prompt-lengths", default="128,512,2048",
                   help="prefill and time-to-first-token prompt lengths (default 128,512,2048)")
    p.add_argument("--decode-prompt", type=positive(int), default=128, help="prompt tokens before decode (default 128)")
    p.add_argument("--new-tokens", type=positive(int), default=64,
                   help="decode steps timed per turn, EOS ignored (default 64)")
    p.add_argument("--reps", type=positive(int), default=2, help="turns per variant, taken in rotation; the "
                                                                 "median is reported (default 2)")
    p.add_argument("--threads", type=positive(int), default=1, help="CPU threads of every engine (default 1)")
    p.add_argument("--gen-prompts", type=int, default=32, metavar="N",
                   help="sms_spam evaluation messages for the generated-length comparison (0: skip; default 32)")
    p.add_argument("--gen-tokens", type=positive(int), default=64, help="cap of each generated answer (default 64)")
    p.add_argument("--out", required=True, help="results folder; models and GGUF files built there are reused")
    p.add_argument("--force", action="store_true", help="measure again into an --out that already has results")


def run_speed(args) -> None:
    specs = model_specs(parse_list(args.ratios, float, "--ratios"), parse_list(args.multiple_of, int, "--multiple-of"))
    lengths = parse_list(args.prompt_lengths, int, "--prompt-lengths")
    settings = SpeedSettings(prompt_lengths=tuple(sorted(set(lengths))), decode_prompt=args.decode_prompt,
                             new_tokens=args.new_tokens, reps=args.reps, threads=args.threads)
    import torch

    torch.set_num_threads(args.threads)  # building and the generated lengths too (untimed): a shared machine
    build = BuildSettings(model=args.model, corpus=args.corpus, calib_tokens=args.calib_tokens, method=args.method)
    deploy_speed(args.out, build, specs, parse_list(args.engines, str, "--engines"),
                 settings, data_dir=args.data_dir, gen_prompts=args.gen_prompts, gen_tokens=args.gen_tokens,
                 force=args.force)
    out = Path(args.out)
    print((out / "results.md").read_text())
    print(f"results in {out}/results.json and results.md, the plot in {out}/deploy_speed.png")
