"""The ``glu-prune`` command: one subcommand per step of the pipeline."""

from __future__ import annotations

import argparse
import json
import os
import sys

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
    model, tokenizer = load_model(args.model, device=args.device, dtype=args.dtype)
    result = perplexity(model, tokenizer, corpus, seq_len=args.seq_len, max_tokens=args.max_tokens,
                        max_docs=args.max_docs, batch_size=args.batch_size, progress=not args.json)
    if args.json:
        print(json.dumps({**result.as_dict(), "model": args.model, "corpus": corpus.name, "part": corpus.part,
                          "seq_len": args.seq_len, "dtype": args.dtype}))
    else:
        print(f"{args.model} on {corpus.name} ({corpus.part}): perplexity {result.perplexity:.2f} "
              f"over {result.tokens} tokens in {result.sequences} sequences, "
              f"{result.seconds:.1f} s ({result.tokens_per_second:.0f} tok/s)")


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
        print("glu-prune: interrupted; nothing partial was written", file=sys.stderr)
        return 130
    except Exception as exc:  # any other failure still gets one line; --debug shows the traceback
        first = str(exc).splitlines()[0] if str(exc) else ""
        print(f"glu-prune: unexpected error: {type(exc).__name__}: {first} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
