"""Large per-layer tensors kept on disk, one raw file per tensor, read back on each access: an
offloaded run then holds one layer's second moment (x xᵀ) in memory instead of every layer's.

Only what is large goes to disk: every tensor field of a :class:`LayerStats` with two or more
dimensions (the second moment, or a small held-out slice's activations); the per-neuron sums stay
in memory. A second moment, symmetric, is written as its upper triangle row by row (``n (n + 1) / 2``
values, about half the matrix) and mirrored again when read, bit for bit (a matrix that is not
exactly symmetric is written whole). A file holds the tensor's bytes and nothing else, so what a
spill writes is known before it starts (:func:`spill_bytes`), said on the log and checked against
the free disk (:func:`check_disk`).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import NamedTuple

import torch

from calibrate.errors import GluPruneError
from calibrate.moments import mirror_upper, strips
from calibrate.resources import human_bytes
from calibrate.stats import LayerStats

log = logging.getLogger("glu_prune")
DISK_MARGIN = 64 << 20  # left free beyond a spill: besides a twentieth of the spill itself
SPILL_HINT = "--spill-dir on a disk with room, or fewer layers (--layers) / --reconstruct none"


def packed_bytes(size: int, itemsize: int = 8) -> int:
    """Bytes of a ``size × size`` symmetric matrix written as its upper triangle (:func:`write_packed`)."""
    return itemsize * size * (size + 1) // 2


def spill_bytes(sizes: list[int], held_tokens: int | None = None, activation_itemsize: int = 4) -> int:
    """Bytes :class:`SpilledLayers` writes for the statistics of layers of these sizes: each layer's
    fit second moment as a packed triangle and, with ``held_tokens`` (the held-out slice's real
    tokens), its held-out slice: the activations (``held_tokens × size``, ``activation_itemsize``
    bytes a value) while the slice has no more tokens than the layer has neurons, else a packed
    triangle too (:class:`calibrate.hooks.Recorder` keeps whichever is smaller)."""
    def held(size: int) -> int:
        if held_tokens is None:
            return 0
        return held_tokens * size * activation_itemsize if held_tokens <= size else packed_bytes(size)

    return sum(packed_bytes(s) + held(s) for s in sizes)


def free_disk(folder: str | Path) -> int:
    """Free bytes on the file system of ``folder`` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk(folder: str | Path, needed: int, what: str, hint: str = SPILL_HINT) -> None:
    """Say (one ``note:``) that ``needed`` bytes of ``what`` will be written under ``folder``; refuse
    in one line when its disk has less free than that plus a margin (before anything is written)."""
    free = free_disk(folder)
    margin = DISK_MARGIN + needed // 20
    if needed + margin > free:
        raise GluPruneError(f"{what} need {human_bytes(needed)} of disk in {Path(folder).absolute()} but only "
                            f"{human_bytes(free)} is free: {hint}")
    log.info("writing %s of %s to a temporary folder in %s (%s free), removed after use", human_bytes(needed),
             what, Path(folder).absolute(), human_bytes(free))


def write_raw(tensor: torch.Tensor, path: Path) -> int:
    """The tensor's bytes (CPU, contiguous) into ``path``; returns how many."""
    data = tensor.detach().cpu().contiguous()
    view = memoryview(data.view(torch.uint8).reshape(-1).numpy())
    with open(path, "wb") as f:
        f.write(view)
    return view.nbytes


def read_raw(path: Path, shape: torch.Size, dtype: torch.dtype, packed: bool = False) -> torch.Tensor:
    """The tensor :func:`write_raw` (or, ``packed``, :func:`write_packed`) wrote into ``path``."""
    if packed:
        return read_packed(path, shape[0], dtype)
    tensor = torch.empty(shape, dtype=dtype)
    with open(path, "rb") as f:
        if f.readinto(memoryview(tensor.view(torch.uint8).reshape(-1).numpy())) != tensor.numel() * dtype.itemsize:
            raise GluPruneError(f"{path} is shorter than it was written: is its disk full?")
    return tensor


def symmetric(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a square matrix equal to its transpose bit for bit (compared a strip at a time)."""
    if tensor.dim() != 2 or tensor.shape[0] != tensor.shape[1]:
        return False
    return all(torch.equal(tensor[start:end], tensor[:, start:end].T) for start, end in strips(tensor.shape[0]))


def rows_of(matrix: torch.Tensor):
    """A row-indexable byte view of a CPU matrix (numpy, contiguous)."""
    return matrix.view(torch.uint8).numpy()


def write_packed(tensor: torch.Tensor, path: Path) -> int:
    """The upper triangle of the square ``tensor`` (CPU, contiguous), row by row from the diagonal, into
    ``path``; returns the bytes written (:func:`packed_bytes`)."""
    data = tensor.detach().cpu().contiguous()
    size, item = data.shape[0], data.dtype.itemsize
    raw, written = rows_of(data), 0
    with open(path, "wb") as f:
        for i in range(size):
            written += f.write(memoryview(raw[i, i * item:]))
    return written


def read_packed(path: Path, size: int, dtype: torch.dtype) -> torch.Tensor:
    """The symmetric ``size × size`` matrix whose upper triangle :func:`write_packed` wrote into ``path``."""
    tensor = torch.zeros(size, size, dtype=dtype)
    raw, item = rows_of(tensor), dtype.itemsize
    with open(path, "rb") as f:
        for i in range(size):
            if f.readinto(memoryview(raw[i, i * item:])) != (size - i) * item:
                raise GluPruneError(f"{path} is shorter than it was written: is its disk full?")
    return mirror_upper(tensor)


class OnDisk(NamedTuple):
    """A tensor written to its file: what reading it back needs."""

    shape: torch.Size
    dtype: torch.dtype
    packed: bool = False  # the upper triangle only (:func:`write_packed`)


class SpilledTensors(MutableMapping):
    """``{key: value}`` whose large tensors live in ``folder`` (created; the caller removes it). A value is
    a :class:`LayerStats`, a tensor or a tuple of tensors and Nones; its tensors of ``min_dims`` or more
    dimensions are written to files (in ``dtype`` when given) and loaded again on each read, so they
    are in memory only while the caller holds the value; the parts named in ``packed`` (a
    :class:`LayerStats`'s second moment) are written as their upper triangle when exactly symmetric.
    ``written`` counts the bytes written."""

    def __init__(self, folder: str | Path, min_dims: int = 2, dtype: torch.dtype | None = None,
                 packed: tuple[str, ...] = ("second_moment",)):
        self.folder, self.min_dims, self.dtype, self.packed = Path(folder), min_dims, dtype, packed
        self.folder.mkdir(parents=True, exist_ok=True)
        self.kept: dict = {}  # key -> (the value's form, {part: small value, or (shape, dtype) of a file})
        self.written = 0

    def path(self, key, part: str) -> Path:
        return self.folder / f"layer-{key}.{part}.bin"

    @staticmethod
    def _parts(value) -> tuple[object, dict[str, object]]:
        if isinstance(value, LayerStats):
            return value, {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        if isinstance(value, tuple):
            return len(value), {str(i): v for i, v in enumerate(value)}
        return None, {"0": value}

    def __setitem__(self, key, value) -> None:
        form, parts = self._parts(value)
        small = {}
        for part, tensor in parts.items():
            if isinstance(tensor, torch.Tensor) and tensor.dim() >= self.min_dims:
                tensor = tensor if self.dtype is None else tensor.to(self.dtype)
                packed = part in self.packed and symmetric(tensor)
                self.written += (write_packed if packed else write_raw)(tensor, self.path(key, part))
                small[part] = OnDisk(tensor.shape, tensor.dtype, packed)
            else:
                small[part] = tensor
        if isinstance(form, LayerStats):
            form = dataclasses.replace(form, **{p: None for p, v in small.items() if isinstance(v, OnDisk)})
        self.kept[key] = (form, small)

    def __getitem__(self, key):
        form, small = self.kept[key]
        parts = {part: read_raw(self.path(key, part), *v) if isinstance(v, OnDisk) else v for part, v in small.items()}
        if isinstance(form, LayerStats):
            return dataclasses.replace(form, **parts)
        return tuple(parts[str(i)] for i in range(form)) if isinstance(form, int) else parts["0"]

    def __delitem__(self, key) -> None:
        _, small = self.kept.pop(key)
        for part, v in small.items():
            if isinstance(v, OnDisk):
                self.path(key, part).unlink(missing_ok=True)

    def __iter__(self) -> Iterator:
        return iter(self.kept)

    def __len__(self) -> int:
        return len(self.kept)


SpilledLayers = SpilledTensors  # ``{layer index: LayerStats}``, the calibration's use


def remove(folder: str | Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
