"""Safetensors checkpoints written a few tensors at a time: shards of a bounded size, named and
indexed as transformers names them, so memory holds one shard at most.

The files are written here (an 8-byte header length, the JSON header, then each tensor's bytes),
straight from the tensors' memory: no serialised copy of a shard is made, and a tensor too large
to hold may be written as row blocks arrive (:meth:`ShardWriter.add_blocks`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterable
from pathlib import Path

import torch

MAX_SHARD_BYTES = 128 * 1024 * 1024
BLOCK_ELEMENTS = 1 << 23  # a tensor larger than this is read and written this many values at a time
DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
          torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
          torch.bool: "BOOL"}


def raw(tensor: torch.Tensor) -> memoryview:
    """The bytes of a CPU tensor, without a copy when it is contiguous."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def header(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict | None = None) -> bytes:
    """The length-prefixed safetensors header of tensors laid out in this order."""
    described, offset = {}, 0
    for name, dtype, shape in entries:
        size = dtype.itemsize
        for d in shape:
            size *= d
        described[name] = {"dtype": DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps({"__metadata__": metadata or {"format": "pt"}, **described}, separators=(",", ":"))
    text += " " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text.encode()


def write_file(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """``tensors`` as one safetensors file, each written from its own memory."""
    with open(path, "wb") as f:
        f.write(header([(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]))
        for tensor in tensors.values():
            f.write(raw(tensor))


class ShardWriter:
    """Tensors added one by one into ``folder``; a shard is written once it holds ``max_bytes``.
    :meth:`finish` names them ``model.safetensors`` (one) or ``model-0000k-of-0000n`` with an index."""

    def __init__(self, folder: str | Path, max_bytes: int = MAX_SHARD_BYTES):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.shards: list[tuple[str, list[str], int]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0

    def next_name(self) -> str:
        return f"shard-{len(self.shards):05d}.safetensors"

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= self.max_bytes:
            self.flush()

    def add_blocks(self, name: str, shape: tuple[int, ...], dtype: torch.dtype,
                   blocks: Iterable[torch.Tensor]) -> None:
        """One tensor of ``shape`` written into a shard of its own from ``blocks`` (its rows, in order, in
        ``dtype``), so that only one block is in memory at a time."""
        expected = dtype.itemsize
        for d in shape:
            expected *= d
        path, written = self.folder / self.next_name(), 0
        with open(path, "wb") as f:
            f.write(header([(name, dtype, tuple(shape))]))
            for block in blocks:
                written += f.write(raw(block.to(dtype)))
        if written != expected:
            path.unlink()
            raise ValueError(f"{name}: {written} bytes written for a tensor of {expected}")
        self.shards.append((path.name, [name], expected))

    def flush(self) -> None:
        name = self.next_name()
        write_file(self.folder / name, self.pending)
        self.shards.append((name, list(self.pending), self.size))
        self.pending, self.size = {}, 0

    def finish(self) -> None:
        if self.pending or not self.shards:
            self.flush()
        if len(self.shards) == 1:
            (self.folder / self.shards[0][0]).rename(self.folder / "model.safetensors")
            return
        weight_map = {}
        for k, (name, tensors, _) in enumerate(self.shards):
            final = f"model-{k + 1:05d}-of-{len(self.shards):05d}.safetensors"
            (self.folder / name).rename(self.folder / final)
            weight_map.update({t: final for t in tensors})
        index = {"metadata": {"total_size": sum(s[2] for s in self.shards)}, "weight_map": weight_map}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
