"""``glu-prune calibrate`` and ``prune`` with no extra flags under a real cgroup memory limit.

    python -m benchmarks.studies.memory_limit --limit 1100M --data-dir ../shared/data

SmolLM2-135M in float64 (1.08 GB of weights), from a model folder and from the .gguf alias (its
conversion done under the limit, in a fresh cache): each command runs once without a limit and
once in a new memory cgroup (v1 or v2) with ``--limit``, each in a child process placed in its
own group, and the limited run's statistics and pruned weights are compared with the unlimited
run's, tensor by tensor, exactly. With ``--blind`` the same limited commands also run as glu-prune
did before it read cgroup limits (only the machine's available memory): the kernel kills them.
Needs root (or a delegated cgroup); the groups are removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks.measures import Cgroup, children_peak_bytes, evict

MiB = 1 << 20


@dataclass
class Run:
    code: int
    seconds: float
    peak: int  # the group's peak charge: process memory and the page cache it touched
    rss: int  # the child's peak resident set (ru_maxrss)
    oom_kills: int
    notes: list[str]


def run(argv: list[str], limit: int | None, env: dict, blind: bool = False) -> Run:
    """``glu-prune argv`` in a child process in a fresh group of ``limit`` bytes."""
    command = [sys.executable, "-m", "benchmarks.studies.memory_limit", "--blind" if blind else "--child", *argv]
    with Cgroup(limit, "glu-prune-bench") as group:
        start = time.perf_counter()
        child = subprocess.Popen(command, env=env, preexec_fn=group.join, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        out, err = child.communicate()  # reads both pipes, then waits
        seconds = time.perf_counter() - start
        result = Run(child.returncode, seconds, group.peak(), children_peak_bytes(), group.oom_kills(),
                     [line for line in (out + err).splitlines() if line.startswith(("note:", "wrote", "glu-prune:"))])
    return result


def child(argv: list[str], blind: bool) -> None:
    """Run ``glu-prune argv`` here; ``blind``: with only the machine's available memory as the limit.
    ``--whole GGUF FOLDER`` / ``--streamed GGUF CACHE``: only the GGUF conversion, whole-model
    (transformers, every tensor at once) or tensor by tensor (into the cache folder CACHE)."""
    if argv[0] in ("--whole", "--streamed"):
        from calibrate import models

        if argv[0] == "--whole":
            Path(argv[2]).mkdir()
            models.convert_whole(Path(argv[1]), Path(argv[2]))
        else:
            os.environ["GLU_PRUNE_CACHE"] = argv[2]
            models.convert_gguf(Path(argv[1]))
        raise SystemExit(0)
    if blind:
        from calibrate import resources

        resources.memory_limit = lambda proc=None: resources.machine_limit()
    import runpy

    sys.argv = ["glu-prune", *argv]  # the command line program itself, run in this patched process
    runpy.run_module("glu_prune_cli.main", run_name="__main__")


def measured(argv: list[str], limit: int | None, env: dict, blind: bool = False) -> Run:
    """:func:`run` in a fresh waiter process, so that its ru_maxrss is this command's alone."""
    spec = json.dumps({"argv": argv, "limit": limit, "env": env, "blind": blind})
    done = subprocess.run([sys.executable, "-m", "benchmarks.studies.memory_limit", "--waiter", spec],
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"benchmark waiter failed: {done.stderr[-2000:]}")
    return Run(**json.loads(done.stdout.strip().splitlines()[-1]))


def tensors(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    return {k: v for f in files for k, v in load_file(f).items()}


def identical(a: Path, b: Path) -> bool:
    import torch

    left, right = tensors(a), tensors(b)
    return left.keys() == right.keys() and all(
        left[k].dtype == right[k].dtype and torch.equal(left[k], right[k]) for k in left)


def float64_folder(folder: Path) -> Path:
    """SmolLM2-135M (the alias's GGUF) saved as a float64 model folder."""
    import torch

    from calibrate.models import load_model

    model, tokenizer = load_model("smollm2-135m", device="cpu", dtype=torch.float64)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def commands(model: str, tokens: str, data: list[str], out: Path) -> dict[str, list[str]]:
    common = ["--model", model, "--corpus", "wikitext2", "--max-tokens", tokens, "--dtype", "float64",
              "--device", "cpu", *data]
    return {"calibrate": ["calibrate", *common, "--out", str(out / "stats.safetensors")],
            "prune": ["prune", *common, "--ratio", "0.2", "--out", str(out / "pruned")]}


def line(name: str, r: Run, limit: int | None) -> str:
    status = "ok" if r.code == 0 else ("killed (out of memory)" if r.code in (-9, 137) else f"exit {r.code}")
    against = f" = {r.peak / limit:.0%} of the limit" if limit else ""
    return (f"{name:<40} {status:<22} {r.seconds:6.1f} s   group peak {r.peak / MiB:6.0f} MiB{against}, "
            f"RSS peak {r.rss / MiB:5.0f} MiB, OOM kills {r.oom_kills}")


def benchmark(limit: int, tokens: str, data_dir: str | None, blind: bool, work: Path) -> dict:
    from calibrate.models import alias_path

    data = ["--data-dir", data_dir] if data_dir else []
    folder = float64_folder(work / "smollm2-f64")
    gguf = alias_path("smollm2-135m")
    results, same = {}, {}
    for source, model in (("folder", str(folder)), ("gguf", "smollm2-135m")):
        outs = {kind: work / source / kind for kind in ("free", "tight", "blind")}
        for out in outs.values():
            out.mkdir(parents=True)
        # each .gguf run converts into its own fresh cache: the limited one under the limit
        envs = {kind: {**os.environ, "GLU_PRUNE_CACHE": str(work / source / f"cache-{kind}")} for kind in outs}
        for step in ("calibrate", "prune"):
            for kind, lim in (("free", None), ("tight", limit), ("blind", limit)):
                if kind == "blind" and not (blind and source == "folder"):
                    continue
                evict(folder, gguf, *(work / source).glob("cache-*"))
                argv = commands(model, tokens, data, outs[kind])[step]
                results[f"{source} {step}, {'no limit' if lim is None else 'limit'}"
                        f"{', blind' if kind == 'blind' else ''}"] = (
                    measured(argv, lim, envs[kind], blind=kind == "blind"), lim)
        free, tight = outs["free"], outs["tight"]
        same[source] = {"statistics": (tight / "stats.safetensors").exists()
                        and identical(free / "stats.safetensors", tight / "stats.safetensors"),
                        "pruned weights": (tight / "pruned").exists() and identical(free / "pruned", tight / "pruned")}
        manifest = tight / "pruned" / "config.json"
        if manifest.exists():
            same[source]["run"] = json.loads(manifest.read_text())["glu_prune"].get("run")
    return {"results": results, "same": same}


def conversions(limit: int, work: Path) -> dict:
    """The alias's .gguf converted alone under ``limit``: as it was (transformers dequantises every
    tensor at once) and tensor by tensor."""
    from calibrate.models import alias_path

    gguf, results = alias_path("smollm2-135m"), {}
    for kind in ("whole", "streamed"):
        evict(gguf)
        results[f"gguf conversion alone, {kind}, limit"] = (
            measured([f"--{kind}", str(gguf), str(work / kind)], limit, dict(os.environ)), limit)
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] in ("--child", "--blind"):
        return child(sys.argv[2:], blind=sys.argv[1] == "--blind")
    if len(sys.argv) > 1 and sys.argv[1] == "--waiter":
        spec = json.loads(sys.argv[2])
        r = run(spec["argv"], spec["limit"], spec["env"], spec["blind"])
        print(json.dumps(r.__dict__))
        return
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", default="1100M", help="the memory limit, e.g. 1100M or 1.2G")
    p.add_argument("--max-tokens", default="2048")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--blind", action="store_true", help="also run the limited commands without reading the limit")
    p.add_argument("--conversion-limit", default=None,
                   help="also convert the .gguf alone under this limit, whole-model and tensor by tensor")
    p.add_argument("--only-conversion", action="store_true", help="only the conversions (with --conversion-limit)")
    p.add_argument("--work", default=None, help="a folder for the temporary outputs (default: the system's)")
    args = p.parse_args()
    reason = Cgroup.unavailable()
    if reason:
        raise SystemExit(reason)
    limit = parse_size(args.limit)
    with tempfile.TemporaryDirectory(dir=args.work) as tmp:
        found = {"results": {}, "same": {}} if args.only_conversion else \
            benchmark(limit, args.max_tokens, args.data_dir, args.blind, Path(tmp))
        if args.conversion_limit:
            found["results"].update(conversions(parse_size(args.conversion_limit), Path(tmp)))
    if not args.only_conversion:
        print(f"limit {limit / MiB:.0f} MiB ({args.limit}); calibrate/prune SmolLM2-135M in float64, "
              f"--max-tokens {args.max_tokens}, no other flags")
    for name, (r, lim) in found["results"].items():
        print(line(name, r, lim))
        for note in r.notes:
            print(f"{'':42}{note[:220]}")
    for source, same in found["same"].items():
        print(f"{source}: limited run identical to the unlimited one: statistics {same['statistics']}, "
              f"pruned weights {same['pruned weights']}; run {same.get('run')}")


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    return int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)


if __name__ == "__main__":
    main()
