"""``glu-prune``: one subcommand per step of the pipeline; every library error becomes one line."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from calibrate.errors import ConfigError, GluPruneError
from calibrate.progress import showing
from glu_prune_cli import compare, export, heal, measure, prune, speed

# name -> (help, add arguments, run)
COMMANDS = {
    "eval": ("perplexity of a model on a corpus (PROTOCOL.md)", measure.add_eval, measure.run_eval),
    "calibrate": ("record activation statistics of every GLU MLP over a corpus", measure.add_calibrate,
                  measure.run_calibrate),
    "stats": ("summarise a statistics file", measure.add_stats, measure.run_stats),
    "prune": ("remove GLU neurons and save the smaller model", prune.add_prune, prune.run_prune),
    "heal": ("distil a pruned model from its unpruned teacher on the calibration corpus", heal.add_heal,
             heal.run_heal),
    "compare": ("cross-domain grid: calibrate on each corpus, prune, evaluate on every corpus", compare.add_compare,
                compare.run_compare),
    "export": ("write a model, pruned or not, as a GGUF file for llama.cpp", export.add_export, export.run_export),
    "speed": ("deployment speed of a model and its pruned copies: prefill, time to first token, decode, memory, "
              "in transformers and llama.cpp", speed.add_speed, speed.run_speed),
}
# library option names whose flag is spelled differently
FLAGS = {"schedule": "sequential", "target": "ratio", "lora_rank": "lora"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="glu-prune", description="Data-driven width pruning of GLU MLPs.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (help_text, add, run) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text, parents=[common])
        add(p)
        p.set_defaults(run=run)
    return parser


def flag_message(exc: ConfigError) -> str:
    """A library setting error written with the command line's flag."""
    if exc.option in FLAGS:
        exc = ConfigError(FLAGS[exc.option], exc.value, exc.problem)
    return exc.as_flag()


def quiet_libraries() -> None:
    """Notices of ours as 'note: ...' lines on stderr; the libraries' own chatter off."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("note: %(message)s"))
    log = logging.getLogger("glu_prune")
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def run_command(args) -> None:
    """The command ``args`` names, with progress bars on stderr unless it prints --json."""
    with showing(not getattr(args, "json", False)):
        args.run(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    if args.debug:
        run_command(args)
        return 0
    try:
        run_command(args)
    except ConfigError as exc:
        print(f"glu-prune: error: {flag_message(exc)}", file=sys.stderr)
        return 2
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
