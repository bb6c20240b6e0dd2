"""Safetensors checkpoints written a few tensors at a time: shards of a bounded size, named and
indexed as transformers names them, so memory holds one shard at most."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

MAX_SHARD_BYTES = 128 * 1024 * 1024


class ShardWriter:
    """Tensors added one by one into ``folder``; a shard is written once it holds ``max_bytes``.
    :meth:`finish` names them ``model.safetensors`` (one) or ``model-0000k-of-0000n`` with an index."""

    def __init__(self, folder: str | Path, max_bytes: int = MAX_SHARD_BYTES):
        self.folder, self.max_bytes = Path(folder), max_bytes
        self.shards: list[tuple[str, list[str], int]] = []
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.pending[name] = tensor.contiguous()
        self.size += tensor.numel() * tensor.element_size()
        if self.size >= self.max_bytes:
            self.flush()

    def flush(self) -> None:
        name = f"shard-{len(self.shards):05d}.safetensors"
        save_file(self.pending, self.folder / name, metadata={"format": "pt"})
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
