"""``glu-prune calibrate`` and ``prune`` with default flags under a real cgroup limit below the float32
model, on a randomly initialised model of a 0.5B model's shapes (Qwen2: hidden 896, 4864 GLU
neurons a layer, 151936-token vocabulary, tied embeddings), from a model folder and from a .gguf
with an empty conversion cache.

    python -m benchmarks.studies.memory_limit_real --limit 1400M --layers 24 --max-tokens 2048 --compare

Each command runs in a child process placed in a new memory cgroup (v1 or v2) of ``--limit``
(swap off), created under this process's group and removed afterwards; the line gives the exit
code (137: killed), the group's peak charge, the child's peak RSS and its glu-prune lines
(``note:``, ``wrote``, errors). Needs root or a delegated cgroup. The model's weights are random:
memory and time do not depend on them.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measures import Cgroup, evict

MiB = 1 << 20
SHAPES = dict(hidden_size=896, intermediate_size=4864, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
              vocab_size=151936, tie_word_embeddings=True, max_position_embeddings=4096)


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


def run(argv: list[str], limit: int | None, env: dict, logs: Path) -> dict:
    """``glu-prune argv`` in a child in a fresh group: exit code, seconds, group peak, child RSS peak, its lines."""
    with Cgroup(limit, "glu-prune-study") as group, open(logs, "w+") as log:
        start = time.perf_counter()
        child = subprocess.Popen([sys.executable, "-m", "glu_prune_cli.main", *argv], env=env,
                                 preexec_fn=group.join, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own peak RSS
        child.returncode = code = os.waitstatus_to_exitcode(status)
        log.seek(0)
        lines = [line.rstrip() for line in log if line.startswith(("note:", "wrote", "glu-prune:"))]
        return {"code": code if code >= 0 else 128 - code, "seconds": time.perf_counter() - start,
                "peak": group.peak(), "rss": usage.ru_maxrss * 1024, "lines": lines}


def tokenizer(vocab: int):
    """A character-level tokenizer padded with filler tokens to ``vocab`` entries (a GGUF's full token list)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    tokens = specials + ["\n"] + [chr(c) for c in range(32, 127)]
    tokens += [f"<filler{i}>" for i in range(vocab - len(tokens))]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def build(work: Path, layers: int) -> tuple[Path, Path, int]:
    """The random model saved as a float32 folder and as an f16 .gguf; returns (folder, gguf, float32 bytes)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from pruning.export_gguf import export_gguf

    torch.manual_seed(0)
    config = AutoConfig.for_model("qwen2", num_hidden_layers=layers, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **SHAPES)
    model = AutoModelForCausalLM.from_config(config).eval()
    tok = tokenizer(SHAPES["vocab_size"])
    folder = work / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    gguf = export_gguf(model, tok, work / "model.gguf", outtype="f16")
    size = sum(p.numel() for p in model.parameters()) * 4
    return folder, gguf, size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", default="1400M", help="the cgroup memory limit (default 1400M)")
    p.add_argument("--layers", type=int, default=24, help="decoder layers (default 24, the 0.5B model's)")
    p.add_argument("--max-tokens", default="2048", help="calibration tokens (default 2048)")
    p.add_argument("--corpus", default=None, help="calibration text file (default: a generated one)")
    p.add_argument("--steps", default="folder calibrate,folder prune,gguf calibrate,gguf prune")
    p.add_argument("--work", default=None, help="a folder for the model and outputs (default: the system's)")
    p.add_argument("--prune-flags", default="", help="more flags for prune, e.g. '--reconstruct lstsq'")
    p.add_argument("--compare", action="store_true",
                   help="run each prune again without the limit and say whether the checkpoints are equal")
    args = p.parse_args()
    limit = parse_size(args.limit)
    if args.work:
        Path(args.work).mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        work = Path(tmp)
        folder, gguf, size = build(work, args.layers)
        corpus = Path(args.corpus) if args.corpus else work / "corpus.txt"
        if not args.corpus:
            corpus.write_text("\n\n".join(f"Document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40
                                          for i in range(200)))
        print(f"model: {args.layers} layers, hidden 896, 4864 neurons, vocab 151936, float32 {size / MiB:.0f} MiB; "
              f".gguf (f16) {gguf.stat().st_size / MiB:.0f} MiB; limit {limit / MiB:.0f} MiB; "
              f"--max-tokens {args.max_tokens}, no other flags")
        for step in args.steps.split(","):
            source, command = step.split()
            model = str(folder if source == "folder" else gguf)
            cache = work / f"cache-{source}-{command}"  # empty: a .gguf is converted under the limit
            out = work / f"{source}-{command}" / ("stats.safetensors" if command == "calibrate" else "pruned")
            out.parent.mkdir()
            flags = ["--ratio", "0.2", *args.prune_flags.split()] if command == "prune" else []
            argv = [command, "--model", model, "--corpus", str(corpus), "--part", "all", "--max-tokens",
                    args.max_tokens, "--device", "cpu", *flags]
            env = {**os.environ, "GLU_PRUNE_CACHE": str(cache), "OMP_NUM_THREADS": "2"}
            evict(folder, gguf)
            r = run(argv + ["--out", str(out)], limit, env, out.parent / "log.txt")
            report(step, r, limit)
            if args.compare and command == "prune" and r["code"] == 0:
                free = run(argv + ["--out", str(out) + "-unlimited"], None, env, out.parent / "log-unlimited.txt")
                report(f"{step} (no limit)", free, None)
                print(f"{'':18}checkpoints equal bit for bit: {same_tensors(out, Path(str(out) + '-unlimited'))}")


def report(step: str, r: dict, limit: int | None) -> None:
    status = "ok" if r["code"] == 0 else ("killed (137)" if r["code"] == 137 else f"exit {r['code']}")
    share = f" ({r['peak'] / limit:.0%} of the limit)" if limit else ""
    print(f"{step:<16} {status:<13} {r['seconds']:7.1f} s  group peak {r['peak'] / MiB:6.0f} MiB{share}, "
          f"RSS peak {r['rss'] / MiB:6.0f} MiB")
    for line in r["lines"]:
        print(f"{'':18}{line[:260]}")


def same_tensors(a: Path, b: Path) -> bool:
    """Whether two saved checkpoints hold the same tensor names with equal values and dtypes."""
    import torch
    from safetensors.torch import load_file

    def state(folder: Path) -> dict:
        return {k: v for shard in sorted(folder.glob("*.safetensors")) for k, v in load_file(shard).items()}

    x, y = state(a), state(b)
    return x.keys() == y.keys() and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


if __name__ == "__main__":
    main()
