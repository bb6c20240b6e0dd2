"""Peak memory of calibrate + prune with and without ``--offload``, side by side in one run.

    python -m benchmarks.studies.offload_memory --model smollm2-135m --corpus wikitext2 --max-tokens 8192

Each variant runs ``glu-prune prune`` in a fresh process that reports its peak resident memory
(:mod:`benchmarks.measures`); a third process only loads the libraries, the config (an empty model) and the
tokenizer, to show the memory above that floor.
The two pruned checkpoints are compared tensor by tensor.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measures import children_peak_bytes, peak_bytes


def child(argv: list[str]) -> None:
    """Run one glu-prune command (or only the imports) and print the peak RSS as JSON."""
    start = time.perf_counter()
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if argv == ["--floor"]:  # the libraries, the config (an empty model) and the tokenizer: what both paths need
        from calibrate.models import model_source
        from calibrate.offload import empty_model

        source = model_source(argv_model())
        empty_model(source, torch.float32)
        transformers.AutoTokenizer.from_pretrained(source)
        code = 0
        peak = peak_bytes()
    else:  # the command in a process of its own: its peak alone, without this one's imports
        code = subprocess.run([sys.executable, "-m", "glu_prune_cli.main", *argv]).returncode
        peak = children_peak_bytes()
    print(json.dumps({"code": code, "peak_bytes": peak, "seconds": time.perf_counter() - start}))


def argv_model() -> str:
    return os.environ.get("GLU_PRUNE_BENCH_MODEL", "smollm2-135m")


def run_child(argv: list[str]) -> dict:
    done = subprocess.run([sys.executable, "-m", "benchmarks.studies.offload_memory", "--child", *argv],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"child failed: {' '.join(argv)}\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def max_difference(a: Path, b: Path) -> float:
    from safetensors.torch import load_file

    left = {k: v for f in sorted(a.glob("*.safetensors")) for k, v in load_file(f).items()}
    right = {k: v for f in sorted(b.glob("*.safetensors")) for k, v in load_file(f).items()}
    if left.keys() != right.keys():
        return float("inf")
    return max(float((left[k].double() - right[k].double()).abs().max()) for k in left)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="wikitext2")
    p.add_argument("--max-tokens", default="8192")
    p.add_argument("--ratio", default="0.2")
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        common = ["prune", "--model", args.model, "--corpus", args.corpus, "--max-tokens", args.max_tokens,
                  "--method", "hybrid", "--ratio", args.ratio, "--device", "cpu"]
        if args.data_dir:
            common += ["--data-dir", args.data_dir]
        os.environ["GLU_PRUNE_BENCH_MODEL"] = args.model
        floor = run_child(["--floor"])
        memory = run_child(common + ["--out", f"{tmp}/memory"])
        offload = run_child(common + ["--offload", "--out", f"{tmp}/offload"])
        difference = max_difference(Path(tmp, "memory"), Path(tmp, "offload"))
    mib = 1024 * 1024
    print(f"libraries + config + tokenizer: peak {floor['peak_bytes'] / mib:7.0f} MiB")
    for name, r in (("in memory", memory), ("--offload", offload)):
        print(f"{name + ':':<31} peak {r['peak_bytes'] / mib:7.0f} MiB, above floor "
              f"{(r['peak_bytes'] - floor['peak_bytes']) / mib:6.0f} MiB, {r['seconds']:.1f} s")
    above = [(r["peak_bytes"] - floor["peak_bytes"]) for r in (memory, offload)]
    print(f"offload / in memory: total peak {offload['peak_bytes'] / memory['peak_bytes']:.2f}x, "
          f"above floor {above[1] / above[0]:.2f}x; largest difference between the pruned weights: {difference:.3g}")


if __name__ == "__main__":
    main()
