"""Second moments ``sum x xᵀ`` at the cost of a float32 product: each block of at most
``MOMENT_BLOCK`` tokens is multiplied in float32 (TF32 off) on the rows' device and added into a
float64 running sum (rows already in float64, from a float64 model, are multiplied in float64).
Only the upper triangle's strips are formed (about (m + 1) / 2m of the square for m strips of
``STRIP`` columns); :func:`mirror_upper` fills the lower triangle when the sum is read.

Against the float64 product the relative difference (Frobenius) is of the order of float32's
rounding, about 1e-7 on random and real activations; ``MOMENT_TOLERANCE`` is the bound the tests hold
it to, for batch-size invariance and additivity too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

MOMENT_BLOCK = 2048  # tokens per float32 product: bounds its round-off, each block then added in float64
STRIP = 1024  # columns per strip of the upper triangle
MOMENT_TOLERANCE = 1e-5  # promised ||S32 - S64||_F / ||S64||_F (batch sizes and runs alike)


def strips(size: int, strip: int | None = None) -> list[tuple[int, int]]:
    """Equal column ranges [start, end) of at most ``strip`` (default ``STRIP``) columns covering ``size``."""
    count = max(1, -(-size // (strip or STRIP)))
    step = -(-size // count)
    return [(start, min(size, start + step)) for start in range(0, size, step)]


@contextmanager
def exact_float32() -> Iterator[None]:
    """Float32 matrix products in full float32 (TF32 off on CUDA), the flag restored afterwards."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    matmul.allow_tf32 = False
    try:
        yield
    finally:
        matmul.allow_tf32 = saved


def product_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision x xᵀ is multiplied in: float32, or float64 for float64 rows."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def add_gram_upper(total: torch.Tensor, rows: torch.Tensor, block: int = MOMENT_BLOCK) -> None:
    """Add the upper-triangle strips of ``rows.T @ rows`` (rows: tokens × size) into ``total``
    (size × size, float64, on the rows' device), one product per block of tokens and strip, in
    :func:`product_dtype`.
    The strict lower triangle outside the diagonal tiles is left alone: :func:`mirror_upper` fills it."""
    parts = strips(total.shape[0])
    with exact_float32():
        for chunk in rows.split(block):
            chunk = chunk.to(product_dtype(chunk.dtype))
            flipped = chunk.T
            for start, end in parts:
                total[start:end, start:].add_(torch.mm(flipped[start:end], chunk[:, start:]))


def mirror_upper(total: torch.Tensor) -> torch.Tensor:
    """Make ``total`` symmetric in place from its upper triangle (as :func:`add_gram_upper` fills it)."""
    for start, end in strips(total.shape[0]):
        tile = total[start:end, start:end]
        tile.copy_(torch.triu(tile) + torch.triu(tile, 1).T)
        total[end:, start:end] = total[start:end, end:].T
    return total


def gram(rows: torch.Tensor) -> torch.Tensor:
    """``rows.T @ rows`` (float64, symmetric) as :func:`add_gram_upper` forms it, on the rows' device."""
    total = torch.zeros(rows.shape[1], rows.shape[1], dtype=torch.float64, device=rows.device)
    add_gram_upper(total, rows)
    return mirror_upper(total)
