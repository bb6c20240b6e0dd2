"""Bad inputs and what ``glu-prune`` answers: shared by the tests and docs/errors.md's generator."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from unittest import mock

import torch
from tiny import tiny_model, tiny_tokenizer

from calibrate.resources import MemoryLimit
from calibrate.run import calibrate
from glu_prune_cli.main import main

ERRORS_MD = Path(__file__).resolve().parents[1] / "docs" / "errors.md"
# The one place where the cases' machine is fixed, so that docs/errors.md reads the same on every machine:
# CUDA is absent and this process may still allocate 16 GiB (MemAvailable); the fixtures folder reads DIR.
MACHINE_MEMORY = MemoryLimit(16 << 30, "MemAvailable, the machine's available memory")

TEXT = "\n\n".join(f"Document {i}: the pruned model keeps the neurons this domain uses." for i in range(40))

# (what is wrong, arguments; {d} is the fixtures folder)
CASES = [
    ("model path does not exist", "eval --model {d}/no-such-model --corpus {d}/c.txt"),
    ("directory that is not a model", "eval --model {d}/not-a-model --corpus {d}/c.txt"),
    ("model without a GLU MLP (GPT-2)", "calibrate --model {d}/gpt2 --corpus {d}/c.txt --out {d}/s.st"),
    ("truncated .gguf", "eval --model {d}/truncated.gguf --corpus {d}/c.txt"),
    ("file that is not GGUF", "eval --model {d}/fake.gguf --corpus {d}/c.txt"),
    ("unknown corpus name", "eval --model {d}/llama --corpus wikitext3"),
    ("missing corpus file", "eval --model {d}/llama --corpus {d}/missing.txt"),
    ("empty corpus file", "eval --model {d}/llama --corpus {d}/empty.txt --part all"),
    ("whitespace-only corpus", "eval --model {d}/llama --corpus {d}/blank.txt --part all"),
    ("binary corpus file", "eval --model {d}/llama --corpus {d}/binary.txt"),
    ("--text-field not in the file", "eval --model {d}/llama --corpus {d}/c.jsonl --text-field body"),
    ("data directory without the corpus files", "eval --model {d}/llama --corpus sms_spam --data-dir {d}/empty-dir"),
    ("fewer tokens than one sequence",
     "calibrate --model {d}/llama --corpus {d}/short.txt --part all --seq-len 512 --out {d}/s.st"),
    ("--ratio outside (0, 1)", "prune --model {d}/llama --method ppm --ratio 1.5 --out {d}/p"),
    ("a target that keeps no neuron", "prune --model {d}/llama --method ppm --ratio 0.999 --out {d}/p"),
    ("--intermediate-size larger than the model's",
     "prune --model {d}/llama --method ppm --intermediate-size 4096 --out {d}/p"),
    ("--multiple-of 0", "prune --model {d}/llama --method ppm --ratio 0.2 --multiple-of 0 --out {d}/p"),
    ("--multiple-of negative", "prune --model {d}/llama --method ppm --ratio 0.2 --multiple-of -8 --out {d}/p"),
    ("--mlp-steps 0", "prune --model {d}/llama --corpus {d}/c.txt --sequential --reconstruct mlp --mlp-steps 0 "
                      "--ratio 0.2 --out {d}/p"),
    ("unknown --mlp-target", "prune --model {d}/llama --corpus {d}/c.txt --sequential --reconstruct mlp "
                             "--mlp-target dense --ratio 0.2 --out {d}/p"),
    ("--reconstruct mlp without --sequential", "prune --model {d}/llama --corpus {d}/c.txt --reconstruct mlp "
                                               "--ratio 0.2 --out {d}/p"),
    ("--layers out of range", "prune --model {d}/llama --method ppm --ratio 0.2 --layers 0-7 --out {d}/p"),
    ("data-driven method without statistics", "prune --model {d}/llama --method hybrid --ratio 0.2 --out {d}/p"),
    ("statistics from another model",
     "prune --model {d}/llama --stats {d}/other.st --method hybrid --ratio 0.2 --out {d}/p"),
    ("truncated statistics file",
     "prune --model {d}/llama --stats {d}/truncated.st --method hybrid --ratio 0.2 --out {d}/p"),
    ("statistics of a newer format", "stats {d}/newer.st"),
    ("reconstruction needs the second moment, the file has none",
     "prune --model {d}/llama --stats {d}/llama.st --method wanda --ratio 0.2 --reconstruct lstsq --out {d}/p"),
    ("bias reconstruction on a family that cannot reload a down_proj bias",
     "prune --model {d}/qwen2 --method ppm --ratio 0.2 --reconstruct bias --corpus {d}/c.txt --out {d}/p"),
    ("--sequential with a statistics file",
     "prune --model {d}/llama --stats {d}/llama.st --method hybrid --ratio 0.2 --sequential --out {d}/p"),
    ("--refit-target dense without --sequential",
     "prune --model {d}/llama --corpus {d}/c.txt --method hybrid --ratio 0.2 --refit-target dense --out {d}/p"),
    ("sensitivity allocation without calibration text",
     "prune --model {d}/llama --stats {d}/llama.st --method hybrid --ratio 0.2 --allocation sensitivity --out {d}/p"),
    ("--allocation-spread outside [0, 0.5]",
     "prune --model {d}/llama --stats {d}/llama.st --method hybrid --ratio 0.2 --allocation owl "
     "--allocation-spread 0.7 --out {d}/p"),
    ("obs scores with the global allocation (a nearly uniform plan)",
     "prune --model {d}/llama --stats {d}/llama.st --method obs --ratio 0.2 --allocation global --out {d}/p"),
    ("neither a width target nor --remove-layers", "prune --model {d}/llama --out {d}/p"),
    ("--remove-layers removes every layer", "prune --model {d}/llama --remove-layers 3 --out {d}/p"),
    ("--remove-layers names a layer twice", "prune --model {d}/llama --remove-layers 1,1 --out {d}/p"),
    ("--remove-layers out of range", "prune --model {d}/llama --remove-layers 0,7 --out {d}/p"),
    ("--remove-layers neither a count nor a list", "prune --model {d}/llama --remove-layers two --out {d}/p"),
    ("--remove-layers on a family without an adapter (GPT-2)", "prune --model {d}/gpt2 --remove-layers 0, --out {d}/p"),
    ("--remove-layers N by cosine, statistics without layer importance",
     "prune --model {d}/llama --stats {d}/llama.st --remove-layers 1 --out {d}/p"),
    ("--remove-layers with a data-driven width target but no corpus",
     "prune --model {d}/llama --stats {d}/llama.st --remove-layers 0, --ratio 0.2 --method hybrid --out {d}/p"),
    ("--remove-layers with --offload", "prune --model {d}/llama --remove-layers 0, --offload --out {d}/p"),
    ("--layer-importance with --offload",
     "calibrate --model {d}/llama --corpus {d}/c.txt --layer-importance --offload --out {d}/s.st"),
    ("NaN or inf activations (float16 overflow)",
     "calibrate --model {d}/overflow --corpus {d}/c.txt --dtype float16 --out {d}/s.st"),
    ("not enough memory for the second-moment matrices",
     "calibrate --model {d}/wide --corpus {d}/c.txt --second-moment --out {d}/s.st"),
    ("not enough memory for one layer's refit, even offloaded",
     "prune --model {d}/wide --corpus {d}/c.txt --ratio 0.2 --reconstruct lstsq --out {d}/p"),
    ("not enough disk for an offloaded prune's refitted weights",
     "prune --model {d}/llama --corpus {d}/c.txt --offload --ratio 0.2 --reconstruct lstsq --spill-dir /proc "
     "--out {d}/p"),
    ("not enough disk for an offloaded prune's spilled statistics (an allocation across layers)",
     "prune --model {d}/llama --corpus {d}/c.txt --offload --ratio 0.2 --reconstruct lstsq --allocation global "
     "--spill-dir /proc --out {d}/p"),
    ("--spill-dir missing",
     "prune --model {d}/llama --corpus {d}/c.txt --offload --ratio 0.2 --reconstruct lstsq --spill-dir {d}/no/such "
     "--out {d}/p"),
    ("--device cuda without a GPU", "eval --model {d}/llama --corpus {d}/c.txt --device cuda"),
    ("output exists, no --force", "prune --model {d}/llama --method ppm --ratio 0.2 --out {d}/existing"),
    ("output folder missing", "prune --model {d}/llama --method ppm --ratio 0.2 --out {d}/no/such/dir"),
    ("output folder not writable", "prune --model {d}/llama --method ppm --ratio 0.2 --out /proc/glu-prune-out"),
    ("statistics output folder not writable",
     "calibrate --model {d}/llama --corpus {d}/c.txt --out /proc/glu-prune.safetensors"),
    ("statistics output exists, no --force", "calibrate --model {d}/llama --corpus {d}/c.txt --out {d}/llama.st"),
    ("export to a k-quant type (the gguf package cannot write one)",
     "export --model {d}/llama --out {d}/m.gguf --outtype q4_k_m"),
    ("export to an unknown --outtype", "export --model {d}/llama --out {d}/m.gguf --outtype q9"),
    ("export output exists, no --force", "export --model {d}/llama --out {d}/existing"),
    ("export of a directory that is not a model", "export --model {d}/not-a-model --out {d}/m.gguf"),
    ("export of a family without a GLU MLP (GPT-2)", "export --model {d}/gpt2 --out {d}/m.gguf"),
    ("export of per-layer widths in a family llama.cpp builds at one width",
     "export --model {d}/qwen2-uneven --out {d}/m.gguf"),
    ("eval with neither --corpus nor --task", "eval --model {d}/llama"),
    ("task file without a label field", "eval --model {d}/llama --task {d}/c.jsonl"),
    ("--label-field not in the task file", "eval --model {d}/llama --task {d}/task.csv --label-field kind"),
    ("task whose examples all have one label", "eval --model {d}/llama --task {d}/one-label.csv"),
    ("fewer calibration examples than --shots", "eval --model {d}/llama --task {d}/task.csv --shots 100"),
    ("unknown prompt template (--templates)", "eval --model {d}/llama --task {d}/task.csv --templates fancy"),
    ("calibrate with both --corpus and --task",
     "calibrate --model {d}/llama --corpus {d}/c.txt --task {d}/task.csv --out {d}/s.st"),
    ("calibrate with neither --corpus nor --task", "calibrate --model {d}/llama --out {d}/s.st"),
    ("prune --task with an evaluation --part",
     "prune --model {d}/llama --task {d}/task.csv --part evaluation --ratio 0.2 --out {d}/p"),
    ("compare with both --ratios and --param-ratios",
     "compare --model {d}/llama --corpora c={d}/c.txt --ratios 0.2 --param-ratios 0.2 --out {d}/p"),
    ("compare --param-ratios outside (0, 1)",
     "compare --model {d}/llama --corpora c={d}/c.txt --param-ratios 1.5 --out {d}/p"),
    ("compare with an unknown depth method",
     "compare --model {d}/llama --corpora c={d}/c.txt --param-ratios 0.2 --methods depth-random --out {d}/p"),
    ("compare --param-ratios that would remove every layer",
     "compare --model {d}/llama --corpora c={d}/c.txt --param-ratios 0.9 --methods depth-cosine --out {d}/p"),
    ("compare --heal-lora without --heal-steps",
     "compare --model {d}/llama --corpora c={d}/c.txt --heal-lora 4 --out {d}/p"),
    ("compare with a depth method and --ratios (fractions of neurons)",
     "compare --model {d}/llama --corpora c={d}/c.txt --ratios 0.2 --methods depth-cosine --out {d}/p"),
]


def make_fixtures(d: Path) -> None:
    """Write the tiny models, corpora and files the cases refer to into ``d``."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2Config, GPT2LMHeadModel

    d.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_tokenizer()
    llama = tiny_model("llama")
    llama.save_pretrained(d / "llama")
    tokenizer.save_pretrained(d / "llama")
    tiny_model("qwen2").save_pretrained(d / "qwen2")
    tokenizer.save_pretrained(d / "qwen2")
    from pruning import PruneConfig, prune
    from pruning.save import save_pruned

    uneven = prune(tiny_model("qwen2"), None, PruneConfig(ratio=0.5, method="ppm", layers=(1,))).model
    save_pruned(uneven, tokenizer, d / "qwen2-uneven")
    overflow = tiny_model("llama")
    with torch.no_grad():
        for p in overflow.model.layers.parameters():
            p.mul_(300.0)  # activations beyond float16's 65504
    overflow.save_pretrained(d / "overflow")
    tokenizer.save_pretrained(d / "overflow")
    # 3 layers of 200000² float64 second moments = 960 GB: more than any machine running the tests has
    wide = tiny_model("llama", intermediate_size=200_000, hidden_size=8, num_attention_heads=2, num_key_value_heads=2,
                      dtype=torch.bfloat16)
    wide.save_pretrained(d / "wide")
    tokenizer.save_pretrained(d / "wide")
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=128)).save_pretrained(d / "gpt2")
    tokenizer.save_pretrained(d / "gpt2")
    (d / "not-a-model").mkdir(exist_ok=True)
    (d / "truncated.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(40))
    (d / "fake.gguf").write_text("this is not a gguf file")
    (d / "c.txt").write_text(TEXT)
    (d / "short.txt").write_text("tiny\n\nsmall")
    (d / "empty.txt").write_text("")
    (d / "blank.txt").write_text("  \n\n\t\n")
    (d / "binary.txt").write_bytes(bytes(range(256)))
    (d / "c.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in TEXT.split("\n\n")))
    (d / "task.csv").write_text("text,label\n" + "".join(f"message {i},{'ab'[i // 5 % 2]}\n" for i in range(40)))
    (d / "one-label.csv").write_text("text,label\n" + "".join(f"message {i},a\n" for i in range(40)))
    (d / "empty-dir").mkdir(exist_ok=True)
    (d / "existing").mkdir(exist_ok=True)
    ids = {"input_ids": torch.randint(3, 100, (2, 8), generator=torch.Generator().manual_seed(0))}
    calibrate(llama, [ids]).save(d / "llama.st")
    calibrate(tiny_model("llama", seed=5), [ids]).save(d / "other.st")
    (d / "truncated.st").write_bytes((d / "llama.st").read_bytes()[:100])
    meta = {"format_version": "99", "layers": "[0]"}
    save_file(load_file(d / "llama.st"), d / "newer.st", metadata=meta)


def run_case(args: str, d: Path) -> tuple[int, str]:
    """Exit code and stderr (the fixtures folder written DIR) of ``glu-prune args`` run in this
    process on the fixed machine of :data:`MACHINE_MEMORY`."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()), \
            mock.patch("torch.cuda.is_available", return_value=False), \
            mock.patch("calibrate.resources.memory_limit", return_value=MACHINE_MEMORY):
        try:
            code = main(args.format(d=d).split())
        except SystemExit as exc:  # argparse refusals
            code = exc.code
    return code, err.getvalue().strip().replace(str(d), "DIR")


def table_row(what: str, args: str, code: int, err: str) -> str:
    """docs/errors.md's row of one case: the command, its exit code and the last line of its stderr."""
    line = [x for x in err.splitlines() if not x.startswith("usage:")][-1].replace("|", "\\|")
    return f"| {what} | `glu-prune {args.format(d='DIR')}` | {code} | {line} |"


def documented_rows(text: str) -> dict[str, str]:
    """{bad input: its row} of docs/errors.md's table (the header rows left out)."""
    rows = [line for line in text.splitlines() if line.startswith("| ")][2:]
    return {row[2:].split(" | ", 1)[0]: row for row in rows}


def cleanup_outputs(d: Path) -> None:
    for name in ("p", "s.st", "m.gguf"):
        path = d / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
