"""Models larger than memory: an empty (meta-device) model whose modules are filled from the
safetensors checkpoint on demand and emptied again after use, one decoder layer at a time."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from calibrate import resources
from calibrate.errors import GluPruneError
from calibrate.glu import glu_layers
from calibrate.manifest import layer_sizes
from calibrate.models import checkpoint_size, model_source
from calibrate.resources import human_bytes, second_moment_bytes

log = logging.getLogger("glu_prune")


class CheckpointWeights:
    """The tensors of a safetensors checkpoint (one file, or shards with an index), read by name."""

    def __init__(self, directory: str | Path):
        from safetensors import safe_open

        self.directory = Path(directory)
        index = self.directory / "model.safetensors.index.json"
        single = self.directory / "model.safetensors"
        if index.is_file():
            self.file_of = dict(json.loads(index.read_text())["weight_map"])
        elif single.is_file():
            with safe_open(single, "pt") as f:
                self.file_of = {name: single.name for name in f.keys()}
        else:
            raise GluPruneError(f"{self.directory} has no model.safetensors: --offload needs a safetensors checkpoint")
        self._safe_open = safe_open

    def __contains__(self, name: str) -> bool:
        return name in self.file_of

    def files(self) -> dict[str, list[str]]:
        """Tensor names per shard file, in checkpoint order."""
        shards: dict[str, list[str]] = {}
        for name, file in self.file_of.items():
            shards.setdefault(file, []).append(name)
        return shards

    def file(self, name: str) -> Path:
        """The file that holds ``name``. Each read opens it: a handle kept open would keep every page
        it touched mapped into memory."""
        if name not in self.file_of:
            raise GluPruneError(f"the checkpoint in {self.directory} has no tensor '{name}': --offload needs a "
                                f"checkpoint saved by transformers")
        return self.directory / self.file_of[name]

    def get(self, name: str) -> torch.Tensor:
        with self._safe_open(self.file(name), "pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        """``name``'s shape, read from the file's header."""
        with self._safe_open(self.file(name), "pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def blocks(self, name: str, elements: int) -> Iterator[torch.Tensor]:
        """``name``'s rows in blocks of about ``elements`` values, read one at a time."""
        shape = self.shape(name)
        row = max(1, math.prod(shape[1:]))
        step = max(1, elements // row)
        for start in range(0, shape[0], step):
            with self._safe_open(self.file(name), "pt") as f:
                yield f.get_slice(name)[start:start + step]


def empty_model(source: str, dtype: torch.dtype):
    """The model of ``source``'s config with every parameter on the meta device (no memory); a
    pruned model's layers take their sizes from its config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(source)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for layer, size in zip(glu_layers(model), layer_sizes(config) or []):
        layer.resize_empty(size)
    return model.eval()


class LayerLoader:
    """Fills a module's parameters from the checkpoint for the time of a ``with`` block."""

    def __init__(self, model: nn.Module, weights: CheckpointWeights, device: torch.device, dtype: torch.dtype):
        self.model, self.weights, self.device, self.dtype = model, weights, device, dtype
        self.names = {module: name for name, module in model.named_modules()}

    @contextmanager
    def loaded(self, module: nn.Module) -> Iterator[nn.Module]:
        from accelerate.utils import set_module_tensor_to_device

        prefix = self.names[module]
        params = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters()]
        try:
            for name in params:
                set_module_tensor_to_device(self.model, name, self.device,
                                            value=self.weights.get(name).to(self.dtype))
            yield module
        finally:
            module.to("meta")


class ResidentLoader:
    """The in-memory case: every module is already loaded (no checkpoint read: no offloaded floor)."""

    dtype = None

    @contextmanager
    def loaded(self, module: nn.Module) -> Iterator[nn.Module]:
        yield module


def keep_large_allocations_mapped(threshold: int = 1 << 20) -> None:
    """Ask glibc to serve allocations above ``threshold`` with mmap, so that each layer's weights go
    back to the system when the layer is emptied; by default glibc raises that threshold after the
    first large free and the freed layers stay in the heap. Ignored where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def offload_model(model_name: str, device: torch.device, dtype: torch.dtype):
    """(empty model, loader, tokenizer) for ``model_name`` (a directory, .gguf or alias; hub ids must be
    downloaded first)."""
    from transformers import AutoTokenizer

    source = model_source(model_name)
    if not Path(source).is_dir():
        raise GluPruneError(f"--offload reads a local checkpoint: download '{model_name}' first "
                            f"(huggingface-cli download {model_name} --local-dir DIR) and pass DIR")
    keep_large_allocations_mapped()
    model = empty_model(source, dtype)
    model.config.name_or_path = model_name
    return model, LayerLoader(model, CheckpointWeights(source), device, dtype), AutoTokenizer.from_pretrained(source)


@dataclass(frozen=True)
class Offloaded:
    """How an offloaded model is run: ``loader`` fills one module at a time from the checkpoint,
    ``device`` is where each runs, ``spill`` (a folder) keeps each layer's statistics in files,
    ``finish`` is handed each layer's statistics as they are recorded
    (:class:`calibrate.layerwise.Placement`)."""

    loader: object
    device: torch.device | None = None
    spill: str | Path | None = None
    finish: object = None


@dataclass(frozen=True)
class OffloadChoice:
    """Whether to work one decoder layer at a time, and why: how a result is computed, never which."""

    offload: bool
    why: str

    def __bool__(self) -> bool:
        return self.offload

    @property
    def note(self) -> dict:
        """The manifest's record of how the run went."""
        return {"run": {"offload": self.offload, "why": self.why}}


def should_offload(model_name: str, asked: bool = False, dtype: torch.dtype = torch.float32,
                   second_moment: bool = False, layers: list[int] | None = None,
                   working: Callable[[list[int], int], int] | None = None) -> OffloadChoice:
    """``asked``, or offload when the in-memory run would need more than 80% of the effective memory
    limit (:func:`calibrate.resources.memory_limit`): the local checkpoint's weights in ``dtype``,
    plus, with ``second_moment``, the selected layers' second moments and their held-out slice's
    (offloaded, one layer's at a time), plus ``working(layer sizes, hidden size)``: the peak of one
    layer's work beyond them (a refit's buffers). Said on the log when it offloads."""
    if asked:
        return OffloadChoice(True, "asked (--offload)")
    size = checkpoint_size(model_name, dtype)
    if not size:
        return OffloadChoice(False, "not a local checkpoint")
    limit = resources.memory_limit()
    if limit is None:
        return OffloadChoice(False, "no memory limit known")
    needed, what = size, f"the model ({human_bytes(size)} in {str(dtype).replace('torch.', '')})"
    if second_moment:
        empty = empty_model(model_source(model_name), dtype)
        sizes = [g.intermediate_size for g in glu_layers(empty, layers)]
        moments = 2 * second_moment_bytes(sizes)
        needed, what = needed + moments, f"{what} and its second moments ({human_bytes(moments)})"
        extra = working(sizes, empty.config.hidden_size) if working is not None else 0
        if extra:
            needed, what = needed + extra, f"{what}, with a refit's buffers ({human_bytes(extra)}),"
    if needed > 0.8 * limit.bytes:
        why = f"{what} would not fit in {limit.text}"
        log.info("%s: working one layer at a time (offload)", why)
        return OffloadChoice(True, why)
    return OffloadChoice(False, f"{what} would fit in {limit.text}")
