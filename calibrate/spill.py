"""Large per-layer tensors kept on disk, one raw file per tensor, read back on each access: an
offloaded run then holds one layer's second moment (x xᵀ) in memory instead of every layer's.

Only what is large goes to disk: every tensor field of a :class:`LayerStats` with two or more
dimensions (the second moment, or a small held-out slice's activations); the per-neuron sums stay
in memory. A second moment, symmetric, is written as its upper triangle row by row (``n (n + 1) / 2``
values, about half the matrix) and mirrored again when read, bit for bit (a matrix that is not
exactly symmetric is written whole); a held-out slice's rows in 16 bits (:func:`half_rows`, the
precision the refit scores them at in memory too). A layer's files are removed once it is refitted
(:meth:`SpilledTensors.release`), so the disk holds at most every layer's statistics, or fewer
statistics and the refits written so far (:func:`spill_peak`). A file holds the tensor's bytes and
nothing else, so what a spill writes is known before it starts (:func:`spill_bytes`), said on the
log and checked against the free disk (:func:`check_disk`).
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
HELD_ROWS_ITEMSIZE = 2  # bytes a value of the held-out rows takes in the spill (:func:`half_rows`)


def packed_bytes(size: int, itemsize: int = 8) -> int:
    """Bytes of a ``size × size`` symmetric matrix written as its upper triangle (:func:`write_packed`)."""
    return itemsize * size * (size + 1) // 2


def half_rows(rows: torch.Tensor) -> torch.Tensor:
    """The held-out rows in 16 bits, as the refit scores its candidates on them (in memory and
    spilled alike): bfloat16 or float16 when that holds them exactly (a 16-bit model's rows), else
    float16 (rounded to nearest, relative error at most 2^-11, values below 2^-24 to 0), or bfloat16
    (at most 2^-8) when a value is beyond float16's range. Idempotent: the values it returns, in any
    dtype, come back from it unchanged."""
    for dtype in (torch.bfloat16, torch.float16):
        half = rows.to(dtype)
        if torch.equal(half.to(rows.dtype), rows):
            return half
    half = rows.to(torch.float16)
    return half if bool(torch.isfinite(half).all()) else rows.to(torch.bfloat16)


def layer_spill_bytes(size: int, held_tokens: int | None = None) -> int:
    """Bytes :class:`SpilledTensors` writes for one layer of ``size`` neurons: its fit second moment as
    a packed triangle and, with ``held_tokens`` (the held-out slice's real tokens), its held-out
    slice: the rows (``held_tokens × size`` values of :data:`HELD_ROWS_ITEMSIZE` bytes) while the
    slice has no more tokens than the layer has neurons, else a packed triangle too
    (:class:`calibrate.hooks.Recorder` keeps whichever is smaller)."""
    if held_tokens is None:
        return packed_bytes(size)
    held = held_tokens * size * HELD_ROWS_ITEMSIZE if held_tokens <= size else packed_bytes(size)
    return packed_bytes(size) + held


def spill_bytes(sizes: list[int], held_tokens: int | None = None) -> int:
    """Bytes written for the statistics of layers of these sizes (:func:`layer_spill_bytes` summed)."""
    return sum(layer_spill_bytes(s, held_tokens) for s in sizes)


def spill_peak(stats: list[int], refits: list[int]) -> int:
    """The most bytes a spill folder holds at once when the layers are refitted in this order, each
    layer's statistics (``stats[i]`` bytes) removed once it is refitted and its refit (``refits[i]``)
    then written: the largest of ``sum(stats[k:]) + sum(refits[:k])`` over ``k``."""
    held, peak = sum(stats), sum(stats)
    for s, r in zip(stats, refits):
        held += r - s
        peak = max(peak, held)
    return peak


def free_disk(folder: str | Path) -> int:
    """Free bytes on the file system of ``folder`` (or of its nearest existing parent)."""
    folder = Path(folder).absolute()
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk(folder: str | Path, needed: int, what: str, hint: str = SPILL_HINT, written: int | None = None) -> None:
    """Say (one ``note:``) that ``needed`` bytes of ``what`` will be held under ``folder`` (``written``
    in all, when files are removed as it goes); refuse in one line when its disk has less free than
    ``needed`` plus a margin (before anything is written)."""
    free = free_disk(folder)
    margin = DISK_MARGIN + needed // 20
    if needed + margin > free:
        raise GluPruneError(f"{what} need {human_bytes(needed)} of disk in {Path(folder).absolute()} but only "
                            f"{human_bytes(free)} is free: {hint}")
    if written is not None and written != needed:
        log.info("writing %s of %s (at most %s at once: a layer's statistics are removed once it is refitted) "
                 "to a temporary folder in %s (%s free), removed after use", human_bytes(written), what,
                 human_bytes(needed), Path(folder).absolute(), human_bytes(free))
        return
    log.info("writing %s of %s to a temporary folder in %s (%s free), removed after use", human_bytes(needed),
             what, Path(folder).absolute(), human_bytes(free))


def write_raw(tensor: torch.Tensor, path: Path) -> int:
    """The tensor's bytes (CPU, contiguous) into ``path``; returns how many."""
    data = tensor.detach().cpu().contiguous()
    view = memoryview(data.view(torch.uint8).reshape(-1).numpy())
    with open(path, "wb") as f:
        f.write(view)
    return view.nbytes


def read_raw(path: Path, shape: torch.Size, dtype: torch.dtype, packed: bool = False,
             read_as: torch.dtype | None = None) -> torch.Tensor:
    """The tensor :func:`write_raw` (or, ``packed``, :func:`write_packed`) wrote into ``path`` (in
    ``read_as`` when given)."""
    if packed:
        return read_packed(path, shape[0], dtype)
    if read_as is not None and read_as != dtype:
        return read_raw(path, shape, dtype).to(read_as)
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
    read_as: torch.dtype | None = None  # the dtype it had in memory, when written narrower (:func:`half_rows`)


class SpilledTensors(MutableMapping):
    """``{key: value}`` whose large tensors live in ``folder`` (created; the caller removes it). A value is
    a :class:`LayerStats`, a tensor or a tuple of tensors and Nones; its tensors of ``min_dims`` or more
    dimensions are written to files (in ``dtype`` when given) and loaded again on each read, so they
    are in memory only while the caller holds the value; the parts named in ``packed`` (a
    :class:`LayerStats`'s second moment) are written as their upper triangle when exactly symmetric,
    those named in ``half`` (held-out rows) in 16 bits (:func:`half_rows`; read back in their dtype).
    ``written`` counts the bytes written."""

    def __init__(self, folder: str | Path, min_dims: int = 2, dtype: torch.dtype | None = None,
                 packed: tuple[str, ...] = ("second_moment",), half: tuple[str, ...] = ()):
        self.folder, self.min_dims, self.dtype, self.packed = Path(folder), min_dims, dtype, packed
        self.half = half
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
                read_as = tensor.dtype if part in self.half else None
                tensor = half_rows(tensor) if part in self.half else tensor
                packed = part in self.packed and symmetric(tensor)
                self.written += (write_packed if packed else write_raw)(tensor, self.path(key, part))
                small[part] = OnDisk(tensor.shape, tensor.dtype, packed, read_as)
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

    def release(self, key) -> None:
        """Remove ``key``'s files; its value keeps its small parts, the written ones become None."""
        _, small = self.kept[key]
        for part, v in small.items():
            if isinstance(v, OnDisk):
                self.path(key, part).unlink(missing_ok=True)
                small[part] = None

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


def release_layer(stats, index: int) -> None:
    """Remove the spilled files of layer ``index`` of ``stats`` (an :class:`ActivationStats`), fit and
    held-out, once nothing needs them; statistics held in memory are left as they are."""
    for layers in (stats.layers, stats.holdout or {}):
        if isinstance(layers, SpilledTensors) and index in layers:
            layers.release(index)


def remove(folder: str | Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
