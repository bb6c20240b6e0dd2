"""The deployment benchmark in one run: build (or reuse) the models and files, measure every
variant in turns, each turn in a fresh process, then the generated lengths, then the reports."""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.deploy.engines import generated_lengths, kept_fraction, median_figures
from benchmarks.deploy.report import add_ratios, lengths_markdown, plot_ratios, speed_markdown
from benchmarks.deploy.variants import (
    ENGINES,
    BuildSettings,
    ModelSpec,
    build_gguf,
    build_models,
    check_build,
    check_engines,
    checkpoint_params,
    intermediate_sizes,
)
from calibrate.corpora import load_corpus
from calibrate.errors import ConfigError, GluPruneError
from calibrate.files import atomic_file, check_output, write_text

log = logging.getLogger("glu_prune")


@dataclass(frozen=True)
class SpeedSettings:
    """What every turn measures: prefill and time to first token at ``prompt_lengths``, decode of
    ``new_tokens`` after a ``decode_prompt``-token prompt; ``reps`` turns per variant, ``threads`` CPU
    threads in every engine."""

    prompt_lengths: tuple[int, ...] = (128, 512, 2048)
    decode_prompt: int = 128
    new_tokens: int = 64
    reps: int = 2
    threads: int = 2
    seed: int = 0
    timeout_s: float = 1800.0

    def __post_init__(self):
        if not self.prompt_lengths or min(self.prompt_lengths) < 1:
            raise ConfigError("prompt_lengths", self.prompt_lengths, "give one or more positive lengths")
        for name in ("decode_prompt", "new_tokens", "reps", "threads"):
            if getattr(self, name) < 1:
                raise ConfigError(name, getattr(self, name), "must be at least 1")

    @property
    def ttft_length(self) -> int:
        """The prompt length whose time to first token the tables show (the shortest: a chat turn)."""
        return min(self.prompt_lengths)

    @property
    def n_ctx(self) -> int:
        return max(*self.prompt_lengths, self.decode_prompt + self.new_tokens) + 16


@dataclass(frozen=True)
class Variant:
    model: str
    engine: str
    path: str
    info: dict

    @property
    def name(self) -> str:
        return f"{self.model} {self.engine}"


def worker_spec(v: Variant, s: SpeedSettings) -> dict:
    runtime, dtype = ENGINES[v.engine]
    return {"runtime": runtime, "dtype": dtype, "path": v.path, "threads": s.threads, "n_ctx": s.n_ctx,
            "prompt_lengths": list(s.prompt_lengths), "decode_prompt": s.decode_prompt, "new_tokens": s.new_tokens,
            "vocab_size": v.info["vocab_size"], "seed": s.seed}


def run_worker(spec: dict, timeout_s: float) -> dict:
    """One turn in a fresh ``python -m benchmarks.deploy.worker`` process; its figures, or ``error``."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "TOKENIZERS_PARALLELISM": "false"}
    try:
        done = subprocess.run([sys.executable, "-m", "benchmarks.deploy.worker", json.dumps(spec)], env=env,
                              capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"turn took over {timeout_s:.0f} s"}
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        return {"error": f"worker failed: {lines[-1] if lines else f'exit code {done.returncode}'}"}
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    for key in ("prefill_tps", "ttft_ms"):
        figures[key] = {int(k): v for k, v in figures[key].items()}
    return figures


def round_robin(variants: list[Variant], reps: int, measure: Callable[[Variant], dict]) -> dict[str, list[dict]]:
    """``reps`` turns of every variant, taking turns (each round starts one variant later); a variant
    whose turn fails is not run again and keeps only the failure."""
    turns: dict[str, list[dict]] = {v.name: [] for v in variants}
    total, done = reps * len(variants), 0
    for rep in range(reps):
        shift = rep % len(variants)
        for v in variants[shift:] + variants[:shift]:
            done += 1
            if turns[v.name] and "error" in turns[v.name][-1]:
                continue
            figures = measure(v)
            if "error" in figures:
                turns[v.name] = [figures]
                log.info("turn %d/%d %s: %s", done, total, v.name, figures["error"])
            else:
                turns[v.name].append(figures)
                log.info("turn %d/%d %s: decode %.1f tok/s, prefill %s tok/s", done, total, v.name,
                         figures["decode_tps"], "/".join(f"{x:.0f}" for x in figures["prefill_tps"].values()))
    return turns


def summarise(v: Variant, turns: list[dict]) -> dict:
    row = {"model": v.model, "engine": v.engine, **{k: v.info[k] for k in ("ratio", "multiple_of", "kept_fraction",
                                                                            "params", "layer_params", "size_bytes")}}
    if "error" in turns[-1]:
        return {**row, "error": turns[-1]["error"]}
    row.update(median_figures([{k: t[k] for k in ("prefill_tps", "ttft_ms", "decode_tps")} for t in turns]))
    row["peak_bytes"] = statistics.median(t["peak_bytes"] for t in turns)
    row["floor_bytes"] = statistics.median(t["floor_bytes"] for t in turns)
    row["turns"] = turns  # every turn's figures, in the order they ran, for the spread between turns
    return row


def model_info(folder: Path, base_sizes: list[int], spec: ModelSpec) -> dict:
    params, layer_params = checkpoint_params(folder)
    config = json.loads((folder / "config.json").read_text())
    sizes = intermediate_sizes(folder)
    return {"ratio": spec.ratio, "multiple_of": spec.multiple_of, "params": params, "layer_params": layer_params,
            "intermediate_sizes": sizes, "kept_fraction": kept_fraction(sizes, base_sizes),
            "vocab_size": config["vocab_size"]}


def variants_of(specs: list[ModelSpec], folders: dict[str, Path], files: dict, engines: list[str],
                infos: dict[str, dict]) -> tuple[list[Variant], list[dict]]:
    """The variants to measure, and rows for the ones whose file could not be made."""
    import torch

    variants, failed = [], []
    for spec in specs:
        info = infos[spec.name]
        for engine in engines:
            runtime, kind = ENGINES[engine]
            if runtime == "transformers":
                size = info["params"] * torch.empty((), dtype=getattr(torch, kind)).element_size()
                variants.append(Variant(spec.name, engine, str(folders[spec.name]), {**info, "size_bytes": size}))
                continue
            path = files[(spec.name, kind)]
            if isinstance(path, str):
                failed.append({"model": spec.name, "engine": engine, "error": path, "size_bytes": None,
                               **{k: info[k] for k in ("ratio", "multiple_of", "kept_fraction", "params",
                                                       "layer_params")}})
                continue
            variants.append(Variant(spec.name, engine, str(path), {**info, "size_bytes": Path(path).stat().st_size}))
    return variants, failed


def measure_lengths(out: Path, folders: dict[str, Path], messages: list[str], max_new_tokens: int,
                    threads: int) -> dict[str, dict]:
    """Generated lengths of every model (transformers, float32), reusing ``out/generated.json`` where
    it holds the same prompts and cap."""
    import torch

    path = out / "generated.json"
    key = {"prompts": len(messages), "max_new_tokens": max_new_tokens}
    cache = json.loads(path.read_text()) if path.is_file() else {}
    results, previous = {}, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for name, folder in folders.items():
            results[name] = cache.get(name) if cache.get(name, {}).get("settings") == key else None
            if results[name] is None:
                results[name] = cache[name] = lengths_of(folder, messages, max_new_tokens, key)
                log.info("generated lengths %s: mean %.1f", name, results[name]["mean"])
                write_text(path, json.dumps(cache, indent=1))
    finally:
        torch.set_num_threads(previous)
    return results


def lengths_of(folder: Path, messages: list[str], max_new_tokens: int, key: dict) -> dict:
    import torch
    from transformers import AutoTokenizer

    from calibrate.models import load_pruned

    model, tokenizer = load_pruned(folder, dtype=torch.float32), AutoTokenizer.from_pretrained(folder)
    lengths = generated_lengths(model, tokenizer, messages, max_new_tokens)
    return {"settings": key, "lengths": lengths, "mean": statistics.mean(lengths), "median": statistics.median(lengths),
            "at_cap": sum(n >= max_new_tokens for n in lengths) / len(lengths)}


def environment(settings: SpeedSettings) -> dict:
    import torch

    env = {"machine": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "threads": settings.threads, "python": platform.python_version()}
    try:
        import llama_cpp

        env["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        env["llama_cpp_python"] = None
    return env


def deploy_speed(out: str | Path, build: BuildSettings, specs: list[ModelSpec], engines: list[str],
                 settings: SpeedSettings = SpeedSettings(), *, data_dir: str | None = None, gen_prompts: int = 32,
                 gen_tokens: int = 64, force: bool = False, progress: bool = True) -> dict:
    """Build what is missing, measure every (model, engine) in turns, the generated lengths, and write
    ``results.json``, ``results.md`` and ``deploy_speed.png`` into ``out``; returns the results."""
    out = Path(out)
    check_engines(engines)
    if gen_prompts < 0:
        raise ConfigError("gen_prompts", gen_prompts, "must be 0 (no generated-length comparison) or more")
    if out.exists() and not out.is_dir():
        raise GluPruneError(f"{out} is a file: --out names a folder")
    if (out / "results.json").exists():
        check_output(out / "results.json", force)
    elif not out.exists():
        check_output(out)
        out.mkdir()
    check_build(out, build)
    messages = load_corpus("sms_spam", part="evaluation", data_dir=data_dir).texts[:gen_prompts] if gen_prompts \
        else []
    folders = build_models(out, specs, build, data_dir=data_dir, progress=progress)
    outtypes = [ENGINES[e][1] for e in engines if ENGINES[e][0] == "llama.cpp"]
    files = build_gguf(out, folders, outtypes, build)
    base_sizes = intermediate_sizes(folders["base"])
    infos = {s.name: model_info(folders[s.name], base_sizes, s) for s in specs}
    variants, failed = variants_of(specs, folders, files, engines, infos)
    if not variants:
        raise GluPruneError("no variant could be built: see the notes above")
    turns = round_robin(variants, settings.reps, lambda v: run_worker(worker_spec(v, settings), settings.timeout_s))
    rows = add_ratios([summarise(v, turns[v.name]) for v in variants] + failed, settings.ttft_length)
    rows.sort(key=lambda r: (engines.index(r["engine"]), [s.name for s in specs].index(r["model"])))
    generated = measure_lengths(out, folders, messages, gen_tokens, settings.threads) if gen_prompts else {}
    results = {"build": asdict(build), "settings": asdict(settings), "environment": environment(settings),
               "models": infos, "rows": rows, "generated": generated}
    write_text(out / "results.json", json.dumps(results, indent=1))
    lengths = list(settings.prompt_lengths)
    md = speed_markdown(rows, lengths, settings.ttft_length)
    if generated:
        md += "\n\n### generated length (sms_spam evaluation, chat template, greedy, EOS respected)\n\n" + \
              lengths_markdown(generated, {n: i["kept_fraction"] for n, i in infos.items()})
    write_text(out / "results.md", md + "\n")
    with atomic_file(out / "deploy_speed.png") as tmp:
        plot_ratios(rows, lengths, settings.ttft_length, tmp)
    return results
