"""What the deployment benchmark measures: the base model, its pruned copies and their GGUF files,
built once into the output folder and reused by later runs with the same settings."""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from calibrate.errors import GluPruneError
from calibrate.files import atomic_file, write_text
from calibrate.models import load_model, load_pruned, model_source, resolve
from pruning.plan import Target

log = logging.getLogger("glu_prune")

# engine name -> (runtime, transformers dtype or GGUF type)
ENGINES = {
    "hf-f32": ("transformers", "float32"),
    "hf-bf16": ("transformers", "bfloat16"),
    "gguf-f16": ("llama.cpp", "f16"),
    "gguf-q8_0": ("llama.cpp", "q8_0"),
    "gguf-q4_0": ("llama.cpp", "q4_0"),
    "gguf-q4_k_m": ("llama.cpp", "q4_k_m"),
}
# GGUF types written by llama.cpp's own quantizer from our f16 export (the gguf package has no 4-bit
# types). q4_k_m is not a default: its blocks of 256 do not divide SmolLM2's hidden size 576, so
# llama.cpp stores most of its tensors as q5_0 instead.
LLAMA_QUANTIZED = {"q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0", "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M"}
DEFAULT_ENGINES = ("hf-f32", "hf-bf16", "gguf-f16", "gguf-q8_0", "gguf-q4_0")


@dataclass(frozen=True)
class BuildSettings:
    """How the pruned models are made; a folder built with other settings is not reused."""

    model: str
    corpus: str
    calib_tokens: int
    method: str
    seed: int = 0


@dataclass(frozen=True)
class ModelSpec:
    """The base model (``ratio`` None) or a copy with ``ratio`` of its GLU neurons removed."""

    ratio: float | None = None
    multiple_of: int = 1

    @property
    def name(self) -> str:
        return "base" if self.ratio is None else f"r{round(self.ratio * 100)}-m{self.multiple_of}"


def model_specs(ratios: list[float], multiples: list[int]) -> list[ModelSpec]:
    """The base model and one pruned model per ratio and multiple (each pair validated as a target)."""
    for r in ratios:
        for m in multiples:
            Target(ratio=r, multiple_of=m)
    return [ModelSpec()] + [ModelSpec(r, m) for r in ratios for m in multiples]


def check_engines(names: list[str]) -> None:
    unknown = [n for n in names if n not in ENGINES]
    if unknown:
        raise GluPruneError(f"unknown engine {unknown[0]}: choose from {', '.join(ENGINES)}")
    import importlib.util

    if any(ENGINES[n][0] == "llama.cpp" for n in names) and importlib.util.find_spec("llama_cpp") is None:
        raise GluPruneError("the gguf-* engines run in llama.cpp: pip install llama-cpp-python, or list only "
                            "hf-* engines in --engines")


def check_build(out: Path, settings: BuildSettings) -> None:
    """Record ``settings`` in ``out/build.json``; refuse a folder built with other settings."""
    path = out / "build.json"
    wanted = asdict(settings)
    if path.is_file():
        found = json.loads(path.read_text())
        if found != wanted:
            changed = ", ".join(k for k in wanted if found.get(k) != wanted[k])
            raise GluPruneError(f"{out} holds models built with other settings ({changed}): choose another --out")
        return
    write_text(path, json.dumps(wanted, indent=1))


def model_folder(out: Path, spec: ModelSpec, settings: BuildSettings) -> Path:
    """Where a model's transformers checkpoint lives: a local base's own folder (a .gguf's converted
    one), every other model in ``out/models``."""
    if spec.ratio is None and resolve(settings.model)[0] != "hub":
        return Path(model_source(settings.model))
    return out / "models" / spec.name


def build_models(out: Path, specs: list[ModelSpec], settings: BuildSettings, data_dir: str | None = None,
                 progress: bool = True) -> dict[str, Path]:
    """Every model's checkpoint folder, pruning (after one calibration of the base) those not yet built."""
    folders = {s.name: model_folder(out, s, settings) for s in specs}
    missing = [s for s in specs if not (folders[s.name] / "config.json").is_file()]
    if not missing:
        return folders
    from calibrate.corpora import load_corpus
    from calibrate.files import atomic_dir
    from calibrate.progress import showing
    from pruning.config import PruneConfig
    from pruning.prune import prune
    from pruning.save import save_pruned
    from pruning.workflow import CalibrationSettings, calibrate_corpus, calibration_batches, provenance

    model, tokenizer = load_model(settings.model, device="cpu", dtype="float32")
    (out / "models").mkdir(exist_ok=True)
    if any(s.ratio is None for s in missing):  # a hub model: saved once, for the engines that load files
        with atomic_dir(folders["base"]) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        missing = [s for s in missing if s.ratio is not None]
    if not missing:
        return folders
    corpus = load_corpus(settings.corpus, part="calibration", data_dir=data_dir)
    calibration = CalibrationSettings(max_tokens=settings.calib_tokens)
    with showing(progress):
        stats = calibrate_corpus(model, calibration_batches(tokenizer, corpus, calibration),
                                 provenance(settings.model, corpus, calibration))
    for spec in missing:
        config = PruneConfig(ratio=spec.ratio, multiple_of=spec.multiple_of, method=settings.method,
                             allocation="uniform", reconstruct="none", seed=settings.seed)
        with showing(False):
            result = prune(model, stats, config)
        save_pruned(result.model, tokenizer, folders[spec.name])
        log.info("pruned %s: intermediate size %d", spec.name, result.manifest.intermediate_sizes[0])
    return folders


def gguf_path(out: Path, name: str, outtype: str) -> Path:
    return out / "gguf" / f"{name}.{outtype}.gguf"


def build_gguf(out: Path, folders: dict[str, Path], outtypes: list[str], settings: BuildSettings,
               threads: int = 1) -> dict:
    """``(model name, GGUF type) -> path`` of every file, or the one-line reason it could not be made.
    f32/f16/bf16/q8_0 come from :func:`pruning.export_gguf.export_gguf`; the ``LLAMA_QUANTIZED`` types
    from llama.cpp's quantizer run on the f16 export."""
    files: dict[tuple[str, str], Path | str] = {}
    if not outtypes:
        return files
    (out / "gguf").mkdir(exist_ok=True)
    kind, source = resolve(settings.model)
    exported = list(dict.fromkeys(("f16" if t in LLAMA_QUANTIZED else t) for t in outtypes))
    for name, folder in folders.items():
        todo = [t for t in exported if not gguf_path(out, name, t).is_file()]
        if todo:
            from transformers import AutoTokenizer

            from pruning.export_gguf import export_gguf

            model, tokenizer = load_pruned(folder), AutoTokenizer.from_pretrained(folder)
            for outtype in todo:
                try:
                    export_gguf(model, tokenizer, gguf_path(out, name, outtype), outtype=outtype,
                                source_gguf=source if kind == "gguf" else None)
                except GluPruneError as exc:
                    files[(name, outtype)] = str(exc)
                    log.info("no %s GGUF of %s: %s", outtype, name, exc)
        for outtype in outtypes:
            target = gguf_path(out, name, outtype)
            if outtype in LLAMA_QUANTIZED and not target.is_file() and gguf_path(out, name, "f16").is_file():
                quantize_gguf(gguf_path(out, name, "f16"), target, outtype, threads)
            if target.is_file():
                files[(name, outtype)] = target
            else:
                files.setdefault((name, outtype), files.get((name, "f16"), f"no {outtype} file was written"))
    return files


def quantize_gguf(source: Path, target: Path, outtype: str, threads: int = 1) -> Path:
    """``source`` (f16) quantised by llama.cpp's ``llama_model_quantize`` to ``outtype``, written
    atomically; llama.cpp's per-tensor messages are kept out of the terminal, and its note on the
    tensors stored in another type becomes one log line."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, LLAMA_QUANTIZED[outtype])
    params.nthread = threads
    with atomic_file(target) as tmp, tempfile.TemporaryFile(mode="w+") as messages:
        sys.stderr.flush()
        saved = os.dup(2)
        os.dup2(messages.fileno(), 2)
        try:
            code = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        messages.seek(0)
        fallback = [line.strip() for line in messages if "fallback quantization" in line]
        if code != 0:
            raise GluPruneError(f"llama.cpp could not quantise {source} to {outtype} (code {code})")
    if fallback:
        log.info("%s: llama.cpp: %s", target.name, fallback[-1].split("WARNING: ", 1)[-1])
    return target


def checkpoint_params(folder: Path) -> tuple[int, int]:
    """(all parameters, decoder-layer parameters) of a safetensors checkpoint, from its headers."""
    from safetensors import safe_open

    total = layers = 0
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, "pt") as f:
            for key in f.keys():
                n = 1
                for d in f.get_slice(key).get_shape():
                    n *= d
                total += n
                layers += n if ".layers." in key else 0
    return total, layers


def intermediate_sizes(folder: Path) -> list[int]:
    """Every layer's GLU width, from config.json (the manifest's list, else the stock size)."""
    config = json.loads((folder / "config.json").read_text())
    sizes = (config.get("glu_prune") or {}).get("intermediate_sizes")
    return list(sizes) if sizes else [config["intermediate_size"]] * config["num_hidden_layers"]
