"""A .gguf file converted into a safetensors folder one tensor at a time.

The file is memory-mapped (``gguf.GGUFReader``); each tensor is dequantised (``gguf.dequantize``,
a slice of rows at a time), renamed and reshaped exactly as transformers' own GGUF loading does
(its tensor processor, e.g. llama's q/k reverse permutation, and its name map), cast to float32,
added to the current shard and dropped once the shard is written. The peak is a shard and a
tensor or two, not the model; the weights are the ones ``from_pretrained(gguf_file=...)`` builds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from calibrate.errors import GluPruneError
from calibrate.shards import ShardWriter

CHUNK_ELEMENTS = 1 << 23  # rows are dequantised this many values at a time (32 MiB of float32)


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

    def __iter__(self):
        """(transformers name, float32 tensor) for every GGUF tensor the model has, in file order."""
        for tensor in self.reader.tensors:
            result = self.processor.process(weights=dequantized(tensor), name=tensor.name,
                                            tensor_key_mapping=self.names, parsed_parameters=self.parsed)
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
