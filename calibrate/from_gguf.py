"""A .gguf file converted into a safetensors folder one tensor at a time.

The file is memory-mapped (``gguf.GGUFReader``); each tensor is dequantised (``gguf.dequantize``,
a slice of rows at a time), renamed and reshaped exactly as transformers' own GGUF loading does
(its tensor processor, e.g. llama's q/k reverse permutation, and its name map), cast to float32,
added to the current shard and dropped once the shard is written. A tensor larger than one slice
that the processor leaves unchanged (embedding tables of large vocabularies, MLP weights) goes
straight into a shard of its own, slice by slice, never whole in memory. The peak is a shard and
a slice or a small tensor, not the model; the weights are the ones ``from_pretrained(gguf_file=...)``
builds.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from calibrate.errors import GluPruneError
from calibrate.shards import BLOCK_ELEMENTS, ShardWriter

CHUNK_ELEMENTS = BLOCK_ELEMENTS  # rows are dequantised this many values at a time (32 MiB of float32)


def row_blocks(tensor, chunk: int = CHUNK_ELEMENTS) -> Iterator[np.ndarray]:
    """One GGUF tensor (two or more dimensions) as float32 blocks of about ``chunk`` values, in row order."""
    from gguf import dequantize

    data = tensor.data
    first = dequantize(data[:1], tensor.tensor_type)
    step = max(1, chunk // first[0].size)
    for start in range(0, data.shape[0], step):
        yield first if start == 0 and step == 1 else dequantize(data[start:start + step], tensor.tensor_type)


@dataclass
class Streamed:
    """A tensor too large to hold twice, handed over as float32 row blocks (``torch`` tensors) of ``shape``."""

    shape: tuple[int, ...]
    blocks: Iterator[torch.Tensor]


def dequantized(tensor, chunk: int = CHUNK_ELEMENTS) -> np.ndarray:
    """One GGUF tensor as float32 values (gguf's dequantisation, applied to slices of rows)."""
    from gguf import dequantize

    data = tensor.data
    if data.ndim < 2 or int(tensor.n_elements) <= chunk:
        return dequantize(data, tensor.tensor_type)
    first = dequantize(data[:1], tensor.tensor_type)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=np.float32)
    step = max(1, chunk // first[0].size)
    for start in range(0, data.shape[0], step):
        out[start:start + step] = dequantize(data[start:start + step], tensor.tensor_type)
    return out


class GgufTensors:
    """The tensors of a .gguf under the names and layout transformers gives them, read one at a time."""

    def __init__(self, path: Path):
        from accelerate import init_empty_weights
        from gguf import GGUFReader
        from transformers import CONFIG_MAPPING, AutoModelForCausalLM
        from transformers.integrations.gguf.utils import is_gguf_arch_supported
        from transformers.modeling_gguf_pytorch_utils import (
            TENSOR_PROCESSORS,
            Gemma2TensorProcessor,
            LlamaTensorProcessor,
            NemotronTensorProcessor,
            TensorProcessor,
            get_gguf_hf_weights_map,
            load_gguf_checkpoint,
            read_field,
        )

        self.reader = GGUFReader(path)
        architecture = read_field(self.reader, "general.architecture")[0]
        processor_class = TENSOR_PROCESSORS.get(architecture, TensorProcessor)
        # these reshape one tensor at a time; the others merge tensors (experts) across calls
        one_at_a_time = {TensorProcessor, LlamaTensorProcessor, Gemma2TensorProcessor, NemotronTensorProcessor}
        if is_gguf_arch_supported(architecture) or processor_class not in one_at_a_time:
            raise NotStreamable(architecture)
        self.reader.fields.clear()  # the metadata, parsed into many small arrays, is read below by transformers
        # the config as AutoConfig.from_pretrained(gguf_file=...) builds it, from the same parsed metadata
        parsed = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        self.config = CONFIG_MAPPING[parsed["model_type"]].from_dict(dict(parsed))
        self.config.dtype = torch.float32
        with init_empty_weights():
            self.model = AutoModelForCausalLM.from_config(self.config, dtype=torch.float32)
        self.model.tie_weights()  # as loading does: a tied parameter then has one name
        self.parsed = {"config": parsed, "tensors": {}}
        self.processor = processor_class(config=parsed)
        self.names = get_gguf_hf_weights_map(self.model, self.processor)

    def expected(self) -> set[str]:
        """The names a saved model holds: every parameter once (a tied one under its first name), and
        the persistent buffers."""
        saved = set(self.model.state_dict())
        return {n for n, _ in self.model.named_parameters()} | {n for n, _ in self.model.named_buffers() if n in saved}

    def process(self, weights: np.ndarray, name: str):
        return self.processor.process(weights=weights, name=name, tensor_key_mapping=self.names,
                                      parsed_parameters=self.parsed)

    def streamed(self, tensor, chunk: int) -> tuple[str, Streamed] | None:
        """(name, :class:`Streamed`) of a tensor larger than one ``chunk`` that the processor leaves as it
        is (tried on its first rows: embeddings and MLP weights; a permuted q/k or a shifted norm is
        not), or None."""
        if tensor.data.ndim < 2 or int(tensor.n_elements) <= chunk:
            return None
        blocks = row_blocks(tensor, chunk)
        first = next(blocks)
        try:
            result = self.process(first.copy(), tensor.name)
        except Exception:  # a processor that needs the whole tensor (a reshape by heads)
            return None
        if result.weights.shape != first.shape or not np.array_equal(result.weights, first):
            return None
        if result.name not in self.names:
            return self.names.get(result.name), None
        shape = (tensor.data.shape[0], *first.shape[1:])
        return self.names[result.name], Streamed(shape, (torch.from_numpy(b if b.flags.writeable else b.copy())
                                                        for b in itertools.chain([first], blocks)))

    def __iter__(self):
        return self.tensors(CHUNK_ELEMENTS)

    def tensors(self, chunk: int):
        """(transformers name, float32 tensor or :class:`Streamed`) for every GGUF tensor the model has,
        in file order: a tensor larger than ``chunk`` values that needs no processing as row blocks."""
        for tensor in self.reader.tensors:
            streamed = self.streamed(tensor, chunk)
            if streamed is not None:
                if streamed[1] is not None:
                    yield streamed
                continue
            result = self.process(dequantized(tensor, chunk), tensor.name)
            if result.name not in self.names:
                continue
            weights = result.weights
            if not (weights.flags.writeable and weights.flags.c_contiguous):
                weights = np.copy(weights)
            yield self.names[result.name], torch.from_numpy(weights).to(torch.float32)


class NotStreamable(Exception):
    """A GGUF architecture whose transformers conversion needs the whole model (merged experts,
    transformers' newer GGUF path): converted by ``from_pretrained`` instead."""


def convert_streamed(path: Path, folder: Path) -> None:
    """Write the .gguf ``path`` into ``folder`` (empty) as a float32 safetensors model with its
    config, generation config and tokenizer, one tensor in memory at a time. Raises
    :class:`NotStreamable` for an architecture whose conversion needs the whole model."""
    from transformers import AutoTokenizer

    tensors = GgufTensors(path)
    shards, written = ShardWriter(folder), set()
    for name, tensor in tensors:
        if isinstance(tensor, Streamed):
            shards.add_blocks(name, tensor.shape, torch.float32, tensor.blocks)
        else:
            shards.add(name, tensor)
        written.add(name)
    missing = tensors.expected() - written
    if missing:
        raise GluPruneError(f"{path} lacks tensors the {tensors.config.model_type} model needs "
                            f"({', '.join(sorted(missing)[:3])}): is the file complete?")
    shards.finish()
    tensors.model.config.architectures = [type(tensors.model).__name__]
    tensors.model.config.save_pretrained(folder)
    if tensors.model.can_generate():
        tensors.model.generation_config.save_pretrained(folder)
    AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(folder)
    (folder / "source.json").write_text(json.dumps({"gguf": str(path.resolve()), "converted": "tensor by tensor"}))
