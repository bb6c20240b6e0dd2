"""Per-layer statistics kept on disk, one file per layer, read back on each access: an offloaded
run then holds one layer's second moment (x xᵀ) in memory instead of every layer's."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from pathlib import Path

from safetensors.torch import load_file, save_file

from calibrate.stats import FIELDS, LayerStats


class SpilledLayers(MutableMapping):
    """``{layer index: LayerStats}`` whose values live in ``folder`` (created; the caller removes it).
    Each read loads the file again, so a value is in memory only while the caller holds it."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.counts: dict[int, int] = {}

    def path(self, index: int) -> Path:
        return self.folder / f"layer-{index}.safetensors"

    def __setitem__(self, index: int, stats: LayerStats) -> None:
        tensors = {f: getattr(stats, f).contiguous() for f in FIELDS}
        for name in ("second_moment", "activations"):
            if getattr(stats, name) is not None:
                tensors[name] = getattr(stats, name).contiguous()
        save_file(tensors, self.path(index))
        self.counts[index] = stats.count

    def __getitem__(self, index: int) -> LayerStats:
        if index not in self.counts:
            raise KeyError(index)
        tensors = load_file(self.path(index))
        return LayerStats(self.counts[index], *(tensors[f] for f in FIELDS), tensors.get("second_moment"),
                          tensors.get("activations"))

    def __delitem__(self, index: int) -> None:
        del self.counts[index]
        self.path(index).unlink(missing_ok=True)

    def __iter__(self) -> Iterator[int]:
        return iter(self.counts)

    def __len__(self) -> int:
        return len(self.counts)
